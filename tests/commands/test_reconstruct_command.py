"""``cryolens reconstruct`` end to end, in-process: voxel size and origin kept, segments, the
folder's index, files never overwritten unasked, copick boxes in place."""
from __future__ import annotations

import mrcfile
import numpy as np
import pytest
from commands_helpers import _cli, _index
from io_helpers import BOX, write_mrc

from cryolens.operations import Operation, run


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
