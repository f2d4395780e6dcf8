"""What every particle command checks of its inputs and arguments, in-process: unreadable and
non-finite particles, counts, voxel sizes, output folders; and ``cryolens info``."""
from __future__ import annotations

import numpy as np
import pytest
from commands_helpers import _cli, _index
from io_helpers import write_mrc

from cryolens.checkpoints import sha256_of
from cryolens.errors import InputError
from cryolens.io import load_particles


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


def test_evaluate_leave_family_out_writes_every_group(tmp_path, capsys):
    """``cryolens evaluate --leave-family-out`` end to end on the demo: every shape family and
    the held-out proteins at each SNR, the held-out ones flagged, the gap to the blur written."""
    import json

    from cryolens.generalisation import HELD_OUT_GROUPS, PROTEINS
    from cryolens.shapes import FAMILIES

    out = tmp_path / "ev"
    assert _cli("evaluate", "-c", "demo", "--device", "cpu", "--snr", 5, "--per-structure", 1,
                "--leave-family-out", "--per-group", 6, "--out", out) == 0
    report = json.loads((out / "generalisation.json").read_text())
    rows = {r["group"]: r for r in report["groups"]}
    assert list(rows) == [*FAMILIES, PROTEINS]
    for group, row in rows.items():
        assert row["held_out"] == (group in HELD_OUT_GROUPS) and row["snr"] == 5.0
        assert row["n_particles"] == (18 if group == PROTEINS else 12)
        assert -1 <= row["model_r_min"] <= row["model_r"] <= 1 and 0 < row["blur_r"] <= 1
    assert set(report["held_out_gap"]) == {*HELD_OUT_GROUPS, "mean"}
    assert [e["n_particles"] for e in report["embeddings"]] == [12 * 2 + 18]
    assert "held-out model r - best blur r" in capsys.readouterr().out
