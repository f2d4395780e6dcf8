"""``cryolens show`` and ``cryolens map``: pictures in the format their suffix names, and map
reading HDF5 embeddings (ours and CryoLens's own script's) as it reads Parquet."""
from __future__ import annotations

import numpy as np
import pytest
from commands_helpers import _cli

from cryolens.checkpoints import sha256_of
from cryolens.errors import InputError


def test_show_and_map_write_pictures(tmp_path, model, folder, project, capsys):
    png = tmp_path / "slices.png"
    assert _cli("show", folder, "-o", png, "-c", model, "--device", "cpu",
                "--max-particles", 2) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 of 5 particles" in capsys.readouterr().out
    config, _ = project
    emb = tmp_path / "emb.parquet"
    assert _cli("embed", config, folder, "--object", "ribosome", "-o", emb, "-c", model,
                "--device", "cpu", "--quiet") == 0
    picture = tmp_path / "map.png"
    assert _cli("map", emb, "-o", picture, "--color-by", "run", "--no-umap") == 0
    assert picture.read_bytes()[:4] == b"\x89PNG"
    assert "coloured by run" in capsys.readouterr().out
    assert _cli("map", emb, "-o", picture, "--dims", "affinity") == 0  # default: by object
    assert _cli("map", emb, "-o", picture, "--color-by", "nope") == 1


def _embed_both(tmp_path, model, *sources) -> tuple:
    """The same inputs embedded to Parquet and to HDF5."""
    outs = (tmp_path / "emb.parquet", tmp_path / "emb.h5")
    for out in outs:
        assert _cli("embed", *sources, "-o", out, "-c", model, "--device", "cpu", "--quiet") == 0
    return outs


def _assert_same_rows(h5_table, parquet_table) -> None:
    """Every column read from the HDF5 file holds the Parquet file's values, row for row."""
    order = [("run", "ascending"), ("source", "ascending"), ("index", "ascending")]
    h5_table, parquet_table = h5_table.sort_by(order), parquet_table.sort_by(order)
    for name in h5_table.column_names:
        got, want = h5_table[name].to_pylist(), parquet_table[name].to_pylist()
        if name in ("voxel_size", "x_angstrom", "y_angstrom", "z_angstrom"):  # float32 in HDF5
            np.testing.assert_allclose(np.array(got, float), np.array(want, float), rtol=1e-6)
        else:
            assert got == want, name


def _map_line(capsys, *args) -> str:
    capsys.readouterr()
    assert _cli("map", *args, "--no-umap") == 0
    return capsys.readouterr().out


def test_map_reads_the_hdf5_of_a_folder_as_its_parquet(tmp_path, model, engine, folder,
                                                       capsys):
    from cryolens.embtable import read_table

    parquet, h5 = _embed_both(tmp_path, model, folder)
    h5_table, parquet_table = read_table(h5), read_table(parquet)
    emb = [f"embedding_{k}" for k in range(engine.config.latent_dims)]
    assert set(h5_table.column_names) == {
        "run", "object", "user_id", "session_id", "voxel_size", "x_angstrom", "y_angstrom",
        "z_angstrom", "global_weight", "source", "index", "edge", *emb}
    assert h5_table["run"].to_pylist() == [None] * 5  # the `particles` group
    assert h5_table["source"].to_pylist() == [str(folder / f"p{i}.mrc") for i in range(5)]
    _assert_same_rows(h5_table, parquet_table)
    picture = tmp_path / "map.png"
    line = _map_line(capsys, h5, "-o", picture)
    assert picture.read_bytes()[:4] == b"\x89PNG"
    assert line == f"wrote {picture}: PCA of 5 particles, coloured by nothing (one colour)\n"
    assert _map_line(capsys, parquet, "-o", picture) == line
    # the affinity part, from the checkpoint's affinity_dims in the file's metadata
    assert _cli("map", h5, "-o", picture, "--no-umap", "--dims", "affinity") == 0
    assert h5_table.schema.metadata[b"checkpoint_sha256"].decode() == sha256_of(model)


def test_map_reads_the_hdf5_of_a_copick_project_as_its_parquet(tmp_path, model, project,
                                                               capsys):
    from cryolens.embtable import read_table

    config, _ = project
    parquet, h5 = _embed_both(tmp_path, model, config, "--object", "ribosome")
    h5_table = read_table(h5)
    assert h5_table["run"].to_pylist() == ["TS_1"] * 3 + ["TS_2"]
    assert h5_table["object"].to_pylist() == ["ribosome"] * 4
    assert h5_table["user_id"].to_pylist() == ["tester"] * 4
    assert h5_table["edge"].to_pylist() == [False, True, True, False]
    _assert_same_rows(h5_table, read_table(parquet))
    picture = tmp_path / "map.png"
    for argv in ((), ("--color-by", "run"), ("--color-by", "edge")):
        line = _map_line(capsys, h5, "-o", picture, *argv)
        assert line == _map_line(capsys, parquet, "-o", picture, *argv)
        assert line.endswith(f"coloured by {argv[1] if argv else 'run'}\n")  # one object


def _write_cryolens_script_h5(path, runs: dict[str, int], dims: int = 8) -> None:
    """An HDF5 file as CryoLens's own copick-embedding script writes it: byte-string labels,
    none of `cryolens embed`'s extra datasets, metadata without `cryolens`."""
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for name, n in runs.items():
            g = f.create_group(name)
            g["structure_labels"] = np.array(["ribosome", "apoferritin"] * (n // 2), dtype="S")
            g["embeddings"] = rng.standard_normal((n, dims)).astype(np.float32)
            g["log_var"] = rng.standard_normal((n, dims)).astype(np.float32)
            g["pose"] = rng.standard_normal((n, 4)).astype(np.float32)
            g["global_weight"] = rng.standard_normal((n, 1)).astype(np.float32)
            g["coordinates_angstrom"] = rng.uniform(0, 900, (n, 3)).astype(np.float32)
            g["coordinates_voxel"] = (g["coordinates_angstrom"][:] / 10).astype(np.float32)
            g["orientations"] = np.tile(np.eye(3, dtype=np.float32), (n, 1, 1))
            g["voxel_spacings"] = np.full(n, 10.0, np.float32)
            g["session_ids"] = np.array(["0"] * n, dtype="S")
            g["user_ids"] = np.array(["curator"] * n, dtype="S")
            g.attrs["n_particles"] = n
        meta = f.create_group("metadata")
        meta.attrs["checkpoint_path"] = "models/cryolens_epoch_2600.pt"
        meta.attrs["box_size"] = 48
        meta.attrs["total_particles"] = sum(runs.values())


def test_map_reads_hdf5_written_by_cryolens_own_script(tmp_path, capsys):
    from cryolens.embtable import read_table

    own = tmp_path / "copick_embeddings.h5"
    _write_cryolens_script_h5(own, {"TS_5": 6, "TS_4": 4})
    table = read_table(own)
    assert table.num_rows == 10
    assert table["run"].to_pylist() == ["TS_4"] * 4 + ["TS_5"] * 6
    assert table["object"].to_pylist()[:4] == ["ribosome", "apoferritin"] * 2
    assert table["user_id"].to_pylist() == ["curator"] * 10
    assert not {"source", "index", "edge"} & set(table.column_names)
    picture = tmp_path / "map.png"
    line = _map_line(capsys, own, "-o", picture)
    assert picture.read_bytes()[:4] == b"\x89PNG"
    assert line == f"wrote {picture}: PCA of 10 particles, coloured by object\n"
    assert _map_line(capsys, own, "-o", picture, "--color-by", "run").endswith("by run\n")
    # it does not record the checkpoint's affinity_dims
    assert _cli("map", own, "-o", picture, "--dims", "affinity") == 1
    assert "does not record its model's affinity dimensions" in capsys.readouterr().err
    with pytest.raises(InputError) as failed:
        _cli("map", own, "-o", picture, "--dims", "affinity", "--log-level", "debug")
    assert failed.value.field == "dims"


def test_map_names_an_hdf5_file_that_holds_no_embeddings(tmp_path, stack, capsys):
    import h5py

    from cryolens.embtable import read_table

    particles = tmp_path / "particles.h5"  # an input stack, not embeddings
    with h5py.File(particles, "w") as f:
        f["particles"] = stack[:2]
        f.create_group("metadata").attrs["box_size"] = 48
    mixed = tmp_path / "mixed.h5"
    _write_cryolens_script_h5(mixed, {"TS_1": 2})
    with h5py.File(mixed, "a") as f:
        f["TS_2/embeddings"] = np.zeros((2, 16), np.float32)
    short = tmp_path / "short.h5"
    _write_cryolens_script_h5(short, {"TS_1": 4})
    with h5py.File(short, "a") as f:
        del f["TS_1/user_ids"]
        f["TS_1/user_ids"] = np.array(["curator"] * 3, dtype="S")
    garbage = tmp_path / "garbage.hdf5"
    garbage.write_bytes(b"not HDF5 at all")
    for path, why in ((particles, "no group holds an `embeddings` dataset"),
                      (mixed, "embeddings differ in width (TS_1: 8, TS_2: 16 dimensions)"),
                      (short, "TS_1/user_ids has shape (3,), but TS_1/embeddings has 4 rows"),
                      (garbage, "not a readable HDF5 file")):
        with pytest.raises(InputError) as failed:
            read_table(path)
        assert failed.value.field == "embeddings"
        assert str(failed.value).startswith(f"{path}: ") and why in str(failed.value)
        assert _cli("map", path, "-o", tmp_path / "map.png") == 1
        err = capsys.readouterr().err
        assert err.startswith(f"cryolens: {path}: ") and why in err and err.count("\n") == 1
    assert not (tmp_path / "map.png").exists()


def test_pictures_are_written_in_the_format_their_suffix_names(tmp_path, model, folder,
                                                                capsys):
    show = ("show", folder, "-c", model, "--device", "cpu", "--max-particles", 1, "-o")
    assert _cli(*show, tmp_path / "x.pdf") == 0
    assert (tmp_path / "x.pdf").read_bytes()[:5] == b"%PDF-"
    assert _cli(*show, tmp_path / "x.jpg") == 0
    assert (tmp_path / "x.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    emb = tmp_path / "emb.parquet"
    assert _cli("embed", folder, "-o", emb, "-c", model, "--device", "cpu", "--quiet") == 0
    assert _cli("map", emb, "-o", tmp_path / "m.pdf", "--no-umap") == 0
    assert (tmp_path / "m.pdf").read_bytes()[:5] == b"%PDF-"
    assert _cli("map", emb, "-o", tmp_path / "m.svg", "--no-umap") == 0
    assert b"<svg" in (tmp_path / "m.svg").read_bytes()[:1000]
    capsys.readouterr()
    for argv in (show, ("map", emb, "-o")):
        assert _cli(*argv, tmp_path / "x.docx") == 1
        err = capsys.readouterr().err
        assert err.startswith(f"cryolens: {tmp_path / 'x.docx'}: cannot write a .docx picture; "
                              "end -o in one of ") and ".pdf" in err and ".png" in err
    assert not (tmp_path / "x.docx").exists()
