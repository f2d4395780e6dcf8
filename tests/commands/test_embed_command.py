"""``cryolens embed`` end to end, in-process: Parquet and HDF5 tables, every input format,
resuming, inputs that changed, against a server."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from commands_helpers import _cli, _features
from io_helpers import BOX, write_mrc

from cryolens.checkpoints import sha256_of
from cryolens.errors import InputError
from cryolens.io import CopickOptions, load_particles


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


@pytest.mark.skipif(importlib.util.find_spec("cryolens.client") is None,
                    reason="cryolens.client (the HTTP client) is not on this branch yet")
def test_embed_against_a_server_matches_in_process(tmp_path, server, engine, folder, stack):
    import pandas as pd

    out = tmp_path / "remote.parquet"
    assert _cli("embed", folder, "-o", out, "--server", server.url, "--quiet") == 0
    frame = pd.read_parquet(out)
    want = _features(engine, stack)
    got = frame[[f"embedding_{k}" for k in range(want["embedding"].shape[1])]].to_numpy()
    np.testing.assert_allclose(got, want["embedding"], atol=1e-5)
