"""The particle commands end to end, in-process: embed, reconstruct, show, map, info."""
from __future__ import annotations

import importlib.util
import json

import mrcfile
import numpy as np
import pytest
from io_helpers import BOX, make_copick_project, particle_stack, write_mrc
from server_helpers import small_model_file

from cryolens.checkpoints import sha256_of
from cryolens.cli import main
from cryolens.engine import Engine
from cryolens.errors import InputError
from cryolens.io import CopickOptions, load_particles
from cryolens.operations import Operation, run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")


@pytest.fixture(scope="module")
def engine(model):
    return Engine.from_checkpoint(str(model), device="cpu")


@pytest.fixture(scope="module")
def stack():
    return particle_stack(5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, stack):
    root = tmp_path_factory.mktemp("mrc")
    for i, volume in enumerate(stack):
        write_mrc(root / f"p{i}.mrc", volume)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_copick_project(tmp_path_factory.mktemp("copick"))


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _features(engine, volumes):
    return run(engine, Operation(kind="features"), volumes).arrays


def test_embed_parquet_has_numeric_columns_and_the_engines_values(tmp_path, model, engine,
                                                                  folder, stack, capsys):
    import pandas as pd
    import pyarrow.parquet as pq

    out = tmp_path / "emb.parquet"
    assert _cli("embed", folder, "-o", out, "-c", model, "--device", "cpu",
                "--batch-size", 2, "--quiet") == 0
    assert "embedded 5 particles" in capsys.readouterr().out
    frame = pd.read_parquet(out)
    emb = [f"embedding_{k}" for k in range(engine.config.latent_dims)]
    numbers = [*emb, "pose_w", "pose_x", "pose_y", "pose_z", "global_weight"]
    assert all(pd.api.types.is_float_dtype(frame[c]) for c in numbers)
    assert list(frame["source"]) == [str(folder / f"p{i}.mrc") for i in range(5)]
    want = _features(engine, stack)
    np.testing.assert_allclose(frame[emb].to_numpy(), want["embedding"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(frame[["pose_w", "pose_x", "pose_y", "pose_z"]].to_numpy(),
                               want["pose"], atol=1e-6)
    np.testing.assert_allclose(frame["global_weight"], want["global_weight"], atol=1e-6)
    assert np.allclose(np.linalg.norm(want["pose"], axis=1), 1, atol=1e-5)
    meta = pq.read_schema(out).metadata
    assert meta[b"checkpoint_sha256"].decode() == sha256_of(model)
    assert json.loads(meta[b"cryolens"])["checkpoint_name"] == "small.safetensors"
    assert not (tmp_path / "emb.parquet.parts").exists()
    # running it again does nothing: the output is complete
    assert _cli("embed", folder, "-o", out, "-c", model, "--device", "cpu", "--quiet") == 0
    assert "already complete" in capsys.readouterr().out


def test_embed_notices_inputs_that_changed_since_the_output(tmp_path, model, stack, capsys):
    import os

    import pandas as pd

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_mrc(folder / f"p{i}.mrc", stack[i])
    out = tmp_path / "o.parquet"
    args = ("embed", folder, "-o", out, "-c", model, "--device", "cpu", "--quiet")
    assert _cli(*args) == 0
    capsys.readouterr()
    write_mrc(folder / "p3.mrc", stack[3])  # a new file: 4 particles now, 3 in the output
    assert _cli(*args) == 1
    err = capsys.readouterr().err
    assert ("made from these sources, but they held 3 particles then and hold 4 now; use "
            "--overwrite") in err
    assert len(pd.read_parquet(out)) == 3
    assert _cli(*args, "--overwrite") == 0
    capsys.readouterr()
    assert _cli(*args) == 0
    assert "already complete (4 particles)" in capsys.readouterr().out
    write_mrc(folder / "p1.mrc", stack[4])  # other contents, the same size
    os.utime(folder / "p1.mrc", ns=(1, 1))
    assert _cli(*args) == 1
    err = capsys.readouterr().err
    assert "their files changed" in err and "--overwrite" in err


def test_a_failed_embed_leaves_nothing_in_the_way_of_the_corrected_one(tmp_path, model,
                                                                         stack, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_mrc(folder / "p0.mrc", stack[0])
    write_mrc(folder / "small.mrc", stack[1][4:44, 4:44, 4:44])

    def embed(out, *more):
        return _cli("embed", folder, "-o", out, "-c", model, "--device", "cpu", "--quiet", *more)

    out = tmp_path / "o.parquet"
    assert embed(out) == 1
    assert "--fit" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet.parts").exists() and not out.exists()
    assert embed(out, "--fit") == 0
    # parts without a particle (left by an older version) are discarded, not in the way
    parts = tmp_path / "p.parquet.parts"
    parts.mkdir()
    (parts / "state.json").write_text(json.dumps({"identity": {"sources": ["elsewhere"]}}))
    assert embed(tmp_path / "p.parquet", "--fit") == 0
    assert not parts.exists()


def test_embed_every_input_format(tmp_path, model, engine, stack):
    import h5py
    import pandas as pd
    import zarr

    np.save(tmp_path / "s.npy", stack[:2])
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["particles"] = stack[2:4]
    zarr.open_group(str(tmp_path / "s.zarr"), mode="w").create_dataset("p", data=stack[4:])
    write_mrc(tmp_path / "s.mrcs", stack[:3].reshape(-1, BOX, BOX), image_stack=True)
    out = tmp_path / "all.parquet"
    sources = [tmp_path / n for n in ("s.npy", "s.h5", "s.zarr", "s.mrcs")]
    assert _cli("embed", *sources, "-o", out, "-c", model, "--device", "cpu", "--quiet") == 0
    frame = pd.read_parquet(out)
    assert list(frame["format"]) == ["npy"] * 2 + ["hdf5"] * 2 + ["zarr"] + ["mrc"] * 3
    assert list(frame["index"]) == [0, 1, 0, 1, 0, 0, 1, 2]
    want = _features(engine, np.concatenate([stack, stack[:3]]))["embedding"]
    got = frame[[f"embedding_{k}" for k in range(want.shape[1])]].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_embed_copick_to_cryolens_hdf5_layout(tmp_path, model, engine, project):
    import h5py

    config, _ = project
    out = tmp_path / "emb.h5"
    assert _cli("embed", config, "--object", "ribosome", "--voxel-spacing", 10, "-o", out,
                "-c", model, "--device", "cpu", "--quiet") == 0
    boxes, _ = load_particles(config, copick=CopickOptions(object="ribosome"))
    want = _features(engine, boxes)
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["TS_1", "TS_2", "metadata"]
        g = f["TS_1"]
        for name in ("embeddings", "log_var", "pose", "pose_quaternion", "global_weight",
                     "coordinates_angstrom", "coordinates_voxel", "structure_labels",
                     "orientations", "voxel_spacings", "session_ids", "user_ids", "edge"):
            assert name in g, name
        assert g.attrs["n_particles"] == 3
        assert g["embeddings"].shape == (3, engine.config.latent_dims)
        assert g["global_weight"].shape == (3, 1)
        np.testing.assert_allclose(g["embeddings"][:], want["embedding"][:3], atol=1e-6)
        np.testing.assert_allclose(g["pose"][:], want["pose_axis_angle"][:3], atol=1e-6)
        np.testing.assert_allclose(g["pose_quaternion"][:], want["pose"][:3], atol=1e-6)
        np.testing.assert_allclose(g["log_var"][:], want["log_variance"][:3], atol=1e-6)
        assert g["coordinates_angstrom"][0].tolist() == [485.0, 476.0, 314.0]
        assert g["coordinates_voxel"][0].tolist() == [49, 48, 31]
        assert g["edge"][:].tolist() == [False, True, True]
        assert g["structure_labels"][:].tolist() == [b"ribosome"] * 3
        meta = f["metadata"]
        assert meta.attrs["checkpoint_sha256"] == sha256_of(model)
        assert meta.attrs["total_particles"] == 4 and meta.attrs["runs_processed"] == 2
        assert meta["structures"][:].tolist() == [b"ribosome"]


def test_embed_resumes_after_an_interruption_without_duplicates(tmp_path, model, engine,
                                                                 folder):
    import pandas as pd

    from cryolens.compute import engine_compute
    from cryolens.io import open_particles
    from cryolens.store import embed

    out = tmp_path / "emb.parquet"
    particles = open_particles(folder)

    def stop(done):
        raise KeyboardInterrupt

    identity = {"sources": [str(folder.resolve())], "read": None, "copick": None,
                "checkpoint_sha256": sha256_of(model), "server": None}
    with pytest.raises(KeyboardInterrupt):
        embed(particles, engine_compute(engine), out, identity=identity, metadata={},
              batch_size=2, progress=False, after_batch=stop)
    parts = tmp_path / "emb.parquet.parts"
    assert not out.exists() and len(list(parts.glob("part-*.parquet"))) == 1
    computed = []
    compute = engine_compute(engine)

    def counting(volumes):
        computed.append(len(volumes))
        return compute(volumes)

    summary = embed(particles, counting, out, identity=identity, metadata={}, batch_size=2,
                    progress=False)
    assert computed == [2, 1] and summary["n"] == 3 and "resumed" in summary["line"]
    resumed = pd.read_parquet(out)
    whole = tmp_path / "whole.parquet"
    embed(particles, compute, whole, identity=identity, metadata={}, batch_size=2,
          progress=False)
    assert resumed["particle_key"].is_unique and len(resumed) == 5
    pd.testing.assert_frame_equal(resumed, pd.read_parquet(whole))
    # another model's unfinished parts are not mixed in
    with pytest.raises(KeyboardInterrupt):
        embed(particles, compute, out.with_name("x.parquet"), identity=identity, metadata={},
              batch_size=2, progress=False, after_batch=stop)
    other = {**identity, "checkpoint_sha256": "0" * 64}
    with pytest.raises(ValueError, match="other inputs or another model"):
        embed(particles, compute, out.with_name("x.parquet"), identity=other, metadata={},
              progress=False)


def test_resume_compares_resolved_paths_and_names_a_removed_input(tmp_path, model, engine,
                                                                  stack, monkeypatch):
    import pandas as pd

    from cryolens.compute import engine_compute
    from cryolens.io import open_particles
    from cryolens.store import embed

    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):
        write_mrc(big / f"p_{i:04d}.mrc", stack[i])
    monkeypatch.chdir(tmp_path)
    identity = {"sources": [str(big.resolve())], "checkpoint_sha256": sha256_of(model)}
    compute = engine_compute(engine)

    def stop(done):
        raise KeyboardInterrupt

    def interrupted(out):
        with pytest.raises(KeyboardInterrupt):
            embed(open_particles("big"), compute, out, identity=identity, metadata={},
                  batch_size=2, progress=False, after_batch=stop)

    interrupted(tmp_path / "o.parquet")  # the folder given relative, then absolute
    summary = embed(open_particles(big.resolve()), compute, tmp_path / "o.parquet",
                    identity=identity, metadata={}, batch_size=2, progress=False)
    assert summary["n"] == 1 and len(pd.read_parquet(tmp_path / "o.parquet")) == 3
    interrupted(tmp_path / "x.parquet")
    (big / "p_0001.mrc").unlink()
    with pytest.raises(InputError, match=r"no longer among the inputs \(first: .*big/p_0001.mrc "
                                         r"particle 0\).*--overwrite"):
        embed(open_particles(big), compute, tmp_path / "x.parquet", identity=identity,
              metadata={}, batch_size=2, progress=False)


def test_reconstruct_keeps_voxel_size_and_origin_and_writes_segments(tmp_path, model, engine,
                                                                     stack, capsys):
    source = write_mrc(tmp_path / "one.mrc", stack[0], voxel_size=10.02,
                       origin=(120.0, -40.0, 8.5))
    out = tmp_path / "rec.mrc"
    assert _cli("reconstruct", source, "-o", out, "-c", model, "--device", "cpu",
                "--pose", "predicted", "--segments") == 0
    want = run(engine, Operation(kind="reconstruct", use_predicted_pose=True, segments=True),
               stack[:1]).arrays
    for path, key in ((out, "reconstruction"), (tmp_path / "rec_affinity.mrc",
                                                "affinity_reconstruction"),
                      (tmp_path / "rec_free.mrc", "free_reconstruction")):
        with mrcfile.open(path) as mrc:
            np.testing.assert_allclose(mrc.data, want[key][0], atol=1e-5)
            assert mrc.voxel_size.x == pytest.approx(10.02, abs=1e-4)
            origin = mrc.header.origin
            assert (float(origin.x), float(origin.y), float(origin.z)) == (120.0, -40.0, 8.5)
    # many particles go to a folder; the default pose is the identity
    stack_file = write_mrc(tmp_path / "s.mrcs", stack[:3])
    assert _cli("reconstruct", stack_file, "-o", tmp_path / "recs", "-c", model,
                "--device", "cpu") == 0
    files = sorted(p.name for p in (tmp_path / "recs").iterdir())
    assert files == ["index.csv", "s_0.mrc", "s_1.mrc", "s_2.mrc"]
    identity = run(engine, Operation(kind="reconstruct"), stack[:3]).arrays["reconstruction"]
    with mrcfile.open(tmp_path / "recs" / "s_2.mrc") as mrc:
        np.testing.assert_allclose(mrc.data, identity[2], atol=1e-5)
    capsys.readouterr()
    assert _cli("reconstruct", stack_file, "-o", tmp_path / "x.mrc", "-c", model) == 1
    assert "give a folder" in capsys.readouterr().err


def _index(folder):
    import csv

    with (folder / "index.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_reconstruct_folder_index_names_each_files_particle(tmp_path, model, stack, project,
                                                            capsys):
    stack_file = write_mrc(tmp_path / "s.mrcs", stack[:3], origin=(7.0, 8.0, 9.0))
    out = tmp_path / "recs"
    assert _cli("reconstruct", stack_file, "-o", out, "-c", model, "--device", "cpu",
                "--segments") == 0
    captured = capsys.readouterr()
    assert f"wrote 9 MRC files to {out} (listed in {out / 'index.csv'})" in captured.out
    assert "reconstruct: 100%" in captured.err  # the progress bar
    rows = _index(out)
    assert [(r["file"], r["affinity_file"], r["free_file"], r["source"], r["index"])
            for r in rows] == [(f"s_{i}.mrc", f"s_{i}_affinity.mrc", f"s_{i}_free.mrc",
                                str(stack_file), str(i)) for i in range(3)]
    assert rows[0]["origin_x"] == "7.0" and rows[0]["run"] == ""
    # a later run into the same folder adds its rows and keeps the earlier ones
    config, _ = project
    assert _cli("reconstruct", config, "--object", "ribosome", "--run", "TS_1", "-o", out,
                "-c", model, "--device", "cpu", "--quiet") == 0
    assert "reconstruct:" not in capsys.readouterr().err
    rows = {r["file"]: r for r in _index(out)}
    assert len(rows) == 6 and rows["s_1.mrc"]["affinity_file"] == "s_1_affinity.mrc"
    pick = rows["TS_1_ribosome_tester_0_0.mrc"]
    assert (pick["run"], pick["object"], pick["affinity_file"]) == ("TS_1", "ribosome", "")
    assert sorted(p.name for p in out.iterdir()) == sorted([*rows, *(
        f"s_{i}_{part}.mrc" for i in range(3) for part in ("affinity", "free")), "index.csv"])
    # one file given twice: the second copy's names get -2, and the index tells them apart
    again = tmp_path / "again"
    assert _cli("reconstruct", stack_file, stack_file, "-o", again, "-c", model,
                "--device", "cpu", "--quiet") == 0
    assert [(r["file"], r["index"]) for r in _index(again)][2:4] == [("s_2.mrc", "2"),
                                                                     ("s_0-2.mrc", "0")]


def test_reconstruct_refuses_before_any_work_when_a_file_exists(tmp_path, model, stack,
                                                                 capsys):
    stack_file = write_mrc(tmp_path / "s.mrcs", stack[:3])
    out = tmp_path / "recs"
    out.mkdir()
    (out / "s_2_free.mrc").write_bytes(b"someone's map")
    (out / "s_1.mrc").write_bytes(b"another")
    argv = ["reconstruct", stack_file, "-o", out, "-c", model, "--device", "cpu", "--segments",
            "--quiet"]
    assert _cli(*argv) == 1
    assert capsys.readouterr().err.strip() == (
        f"cryolens: {out / 's_1.mrc'} exists (and 1 more of the 9 files to write); use "
        "--overwrite to replace it, or another -o")
    assert sorted(p.name for p in out.iterdir()) == ["s_1.mrc", "s_2_free.mrc"]  # untouched
    assert _cli(*argv, "--overwrite") == 0
    assert len(_index(out)) == 3 and len(list(out.glob("*.mrc"))) == 9


@pytest.mark.parametrize("command", ["embed", "reconstruct", "show"])
def test_skip_unreadable_leaves_out_damaged_files_and_says_so(tmp_path, model, folder, command,
                                                              capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in sorted(folder.glob("*.mrc"))[:3]:
        (mixed / p.name).write_bytes(p.read_bytes())
    (mixed / "p1.mrc").write_bytes((folder / "p1.mrc").read_bytes()[:2000])  # copy cut short
    out = tmp_path / {"embed": "e.parquet", "reconstruct": "recs", "show": "s.png"}[command]
    argv = [command, mixed, "-o", out, "-c", model, "--device", "cpu"]
    assert _cli(*argv) == 1
    assert f"{mixed / 'p1.mrc'}: not a valid MRC file" in capsys.readouterr().err
    assert not out.exists()
    assert _cli(*argv, "--skip-unreadable") == 0
    captured = capsys.readouterr()
    assert f"warning: skipped {mixed / 'p1.mrc'}: not a valid MRC file" in captured.err
    if command == "embed":
        import pyarrow.parquet as pq

        assert pq.read_table(out)["source"].to_pylist() == [str(mixed / "p0.mrc"),
                                                            str(mixed / "p2.mrc")]
        assert "1 unreadable file skipped; wrote" in captured.out
    elif command == "reconstruct":
        assert [r["file"] for r in _index(out)] == ["p0_0.mrc", "p2_0.mrc"]
        assert "1 unreadable file skipped; wrote 2 MRC files" in captured.out
    else:
        assert "2 of 2 particles" in captured.out


def test_reconstruct_of_a_fitted_box_overlays_its_input(tmp_path, model, stack):
    source = write_mrc(tmp_path / "box64_origin.mrc", np.pad(stack[0], 8), voxel_size=10.0,
                       origin=(1000.0, 2000.0, 3000.0))
    out = tmp_path / "r.mrc"
    assert _cli("reconstruct", source, "--fit", "-o", out, "-c", model, "--device", "cpu") == 0
    with mrcfile.open(out) as mrc:
        origin = mrc.header.origin
        assert (float(origin.x), float(origin.y), float(origin.z)) == (1080.0, 2080.0, 3080.0)
        assert mrc.data.shape == (BOX, BOX, BOX)


def test_reconstruct_copick_boxes_land_in_the_tomogram(tmp_path, model, project):
    config, _ = project
    out = tmp_path / "boxes"
    assert _cli("reconstruct", config, "--object", "ribosome", "--run", "TS_1", "-o", out,
                "-c", model, "--device", "cpu") == 0
    name = "TS_1_ribosome_tester_0_0.mrc"
    with mrcfile.open(out / name) as mrc:
        origin = mrc.header.origin
        assert (float(origin.x), float(origin.y), float(origin.z)) == (250.0, 240.0, 70.0)
        assert mrc.voxel_size.x == pytest.approx(10.0)
    assert len(list(out.glob("*.mrc"))) == 3 and len(_index(out)) == 3


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


def test_missing_folders_of_an_output_are_created(tmp_path, model, folder):
    nope = tmp_path / "nope" / "deeper"
    args = ("-c", model, "--device", "cpu")
    assert _cli("reconstruct", folder / "p0.mrc", "-o", nope / "x.mrc", *args) == 0
    assert _cli("show", folder, "--max-particles", 1, "-o", nope / "a" / "x.png", *args) == 0
    assert _cli("embed", folder, "-o", nope / "b" / "e.parquet", *args, "--quiet") == 0
    assert _cli("map", nope / "b" / "e.parquet", "-o", nope / "c" / "m.png", "--no-umap") == 0
    for path in ("x.mrc", "a/x.png", "b/e.parquet", "c/m.png"):
        assert (nope / path).stat().st_size > 0, path


def test_info_reports_parameters_hash_and_v001(model, capsys):
    assert _cli("info", model) == 0
    out = capsys.readouterr().out
    assert sha256_of(model) in out and "registry     none: not a named checkpoint" in out
    assert "latent_dims    8" in out and "parameters" in out


def test_wrong_inputs_are_one_line_errors(tmp_path, model, stack, capsys):
    source = write_mrc(tmp_path / "coarse.mrc", stack[0], voxel_size=20.0)
    assert _cli("embed", source, "-o", tmp_path / "e.parquet", "-c", model) == 1
    err = capsys.readouterr().err
    assert "voxel size 20 A, but the model expects 10 A" in err and "Traceback" not in err
    assert _cli("embed", source, "-o", tmp_path / "e.csv", "-c", model) == 1


@pytest.mark.parametrize("command", ["embed", "reconstruct", "show"])
def test_a_non_finite_voxel_is_named_by_file_and_particle(tmp_path, model, stack, command,
                                                           capsys):
    folder = tmp_path / "nanfolder"
    folder.mkdir()
    write_mrc(folder / "a.mrc", stack[0])
    broken = stack[1:3].copy()
    broken[1, 3, 4, 5] = np.nan
    write_mrc(folder / "b.mrcs", broken)
    out = tmp_path / ("x.parquet" if command == "embed" else "x.png" if command == "show"
                      else "recs")
    assert _cli(command, folder, "-o", out, "-c", model, "--device", "cpu") == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after embed's progress bar
    assert last == (f"cryolens: {folder / 'b.mrcs'} particle 1: 1 voxel(s) NaN or infinite (or "
                    "beyond float32); particles must be finite")


@pytest.mark.parametrize("argv", [["embed", "--batch-size", "0", "-o", "e.parquet"],
                                  ["reconstruct", "--batch-size", "-1", "-o", "r.mrc"],
                                  ["show", "--max-particles", "0"],
                                  ["show", "--max-particles", "-2"]])
def test_counts_must_be_positive_whole_numbers(tmp_path, model, stack, argv, capsys):
    source = write_mrc(tmp_path / "p.mrc", stack[0])
    with pytest.raises(SystemExit) as done:
        _cli(argv[0], source, *argv[1:], "-c", model)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"argument {argv[1]}: must be a positive whole number, not '{argv[2]}'" in err


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-3", "ten"])
def test_voxel_size_must_be_a_positive_finite_number(tmp_path, model, stack, value, capsys):
    source = write_mrc(tmp_path / "p.mrc", stack[0])
    with pytest.raises(SystemExit) as done:
        _cli("embed", source, "-o", tmp_path / "e.parquet", "-c", model, "--voxel-size", value)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --voxel-size: " in err and repr(value) in err
    with pytest.raises(InputError, match=r"--voxel-size\) must be a positive, finite number"):
        load_particles(source, declared_voxel_size=float(value) if value != "ten" else -1.0)


def test_voxel_size_overrules_an_anisotropic_header(tmp_path, model, stack, capsys):
    import pandas as pd

    source = write_mrc(tmp_path / "aniso.mrc", stack[0], voxel_size=(10.0, 12.0, 10.0))
    out = tmp_path / "e.parquet"
    assert _cli("embed", source, "-o", out, "-c", model, "--device", "cpu", "--quiet") == 1
    assert "anisotropic voxel size" in capsys.readouterr().err
    assert _cli("embed", source, "-o", out, "-c", model, "--device", "cpu", "--quiet",
                "--voxel-size", 10) == 0
    assert pd.read_parquet(out)["voxel_size"].tolist() == [10.0]


@pytest.mark.skipif(importlib.util.find_spec("cryolens.client") is None,
                    reason="cryolens.client (the HTTP client) is not on this branch yet")
@pytest.mark.slow
def test_embed_against_a_server_matches_in_process(tmp_path, model, engine, folder, stack):
    import pandas as pd
    from server_helpers import start_cli_server

    server = start_cli_server(model)
    try:
        out = tmp_path / "remote.parquet"
        assert _cli("embed", folder, "-o", out, "--server", server.url, "--quiet") == 0
    finally:
        server.stop()
    frame = pd.read_parquet(out)
    want = _features(engine, stack)
    got = frame[[f"embedding_{k}" for k in range(want["embedding"].shape[1])]].to_numpy()
    np.testing.assert_allclose(got, want["embedding"], atol=1e-5)
