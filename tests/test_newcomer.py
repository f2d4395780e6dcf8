"""What a biologist meets in a first afternoon: every hint in a message can be followed and then
works, embeddings made on a server can be mapped like local ones, labels from a CSV file colour a
map, `make serve` installs what serving needs only, and the console's small truths (plurals,
--help examples, `| head`, one registry of commands)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from io_helpers import particle_stack, write_mrc
from server_helpers import small_model_file, start_cli_server

from cryolens.cli import build_parser, main, parse_args
from cryolens.commands import COMMANDS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")


@pytest.fixture(scope="module")
def stack():
    return particle_stack(4)


@pytest.fixture
def folder(tmp_path, stack):
    root = tmp_path / "particles"
    root.mkdir()
    for i, volume in enumerate(stack):
        write_mrc(root / f"p{i}.mrc", volume)
    return root


def cli(capsys, *args) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def embed(capsys, model, *args):
    return cli(capsys, "embed", *args, "-c", model, "--device", "cpu", "--quiet")


# -- every hint is followed, and then it works ------------------------------------------------
def test_a_cut_short_file_points_to_skip_unreadable_which_then_works(capsys, model, folder,
                                                                       tmp_path):
    whole = (folder / "p3.mrc").read_bytes()
    (folder / "p3.mrc").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "e.parquet"
    status, _, err = embed(capsys, model, folder, "-o", out)
    assert status == 1 and f"{folder / 'p3.mrc'}: not a valid MRC file" in err
    assert err.rstrip().endswith("pass --skip-unreadable") and "=True" not in err
    status, printed, err = embed(capsys, model, folder, "-o", out, "--skip-unreadable")
    assert status == 0 and "embedded 3 particles" in printed
    assert f"warning: skipped {folder / 'p3.mrc'}: not a valid MRC file" in err
    assert "pass --skip-unreadable" not in err  # it was passed
    assert "1 unreadable file skipped" in printed and pq.read_table(out).num_rows == 3


@pytest.mark.parametrize("typed", ["particels/", "particels", "particels/p0.mrc"])
def test_a_mistyped_path_is_no_such_file_or_folder_as_typed(capsys, model, folder, typed,
                                                             monkeypatch):
    monkeypatch.chdir(folder.parent)
    status, _, err = embed(capsys, model, typed, "-o", "e.parquet")
    assert status == 1 and err == f"cryolens: {typed}: no such file or folder\n"
    fixed = typed.replace("particels", "particles")
    assert embed(capsys, model, fixed, "-o", "e.parquet")[0] == 0


def test_voxel_size_and_box_errors_name_the_flag_that_then_works(capsys, model, stack, tmp_path):
    fine = write_mrc(tmp_path / "fine.mrc", stack[0], voxel_size=5.0)  # 48^3 at 5 A
    out = tmp_path / "e.parquet"
    status, _, err = embed(capsys, model, fine, "-o", out)
    assert status == 1 and "voxel size 5 A, but the model expects 10 A" in err
    assert "pass --rescale" in err and "=True" not in err
    status, _, err = embed(capsys, model, fine, "-o", out, "--rescale")
    assert status == 1 and "box 24x24x24 voxels (rescaled from 48x48x48 voxels of 5 A)" in err
    assert "pass --fit" in err and "=True" not in err
    status, printed, _ = embed(capsys, model, fine, "-o", out, "--rescale", "--fit")
    assert status == 0 and printed.startswith("embedded 1 particle in ")


def test_affinity_hint_of_a_file_without_metadata_works(capsys, model, folder, tmp_path):
    out = tmp_path / "e.parquet"
    assert embed(capsys, model, folder, "-o", out)[0] == 0
    table = pq.read_table(out)
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "bare.parquet")
    picture = tmp_path / "map.png"
    status, _, err = cli(capsys, "map", tmp_path / "bare.parquet", "-o", picture, "--dims",
                         "affinity", "--no-umap")
    assert status == 1 and err.rstrip().endswith("map it with --dims all")
    assert cli(capsys, "map", tmp_path / "bare.parquet", "-o", picture, "--dims", "all",
               "--no-umap")[0] == 0


# -- the model's metadata, local or from a server --------------------------------------------
@pytest.mark.slow
def test_server_embeddings_record_the_model_as_local_ones_and_map_by_affinity(capsys, model,
                                                                               folder, tmp_path):
    server = start_cli_server(model)
    try:
        for suffix in (".parquet", ".h5"):
            remote, local = tmp_path / f"remote{suffix}", tmp_path / f"local{suffix}"
            assert embed(capsys, model, folder, "-o", remote, "--server", server.url)[0] == 0
            assert embed(capsys, model, folder, "-o", local)[0] == 0
            from cryolens.embtable import metadata_of, read_table

            there, here = metadata_of(read_table(remote)), metadata_of(read_table(local))
            for key in ("checkpoint_name", "checkpoint_sha256", "latent_dims", "affinity_dims",
                        "voxel_size", "box_size"):
                assert there[key] == here[key] is not None, key
            assert (there["latent_dims"], there["affinity_dims"]) == (8, 6)
            assert there["server"] == server.url and here["server"] is None
            status, printed, _ = cli(capsys, "map", remote, "-o", tmp_path / "m.png", "--dims",
                                     "affinity", "--no-umap")
            assert status == 0 and "PCA of 4 particles" in printed
    finally:
        server.stop()


def test_a_server_that_is_not_there_is_named_with_what_to_do(capsys, model, folder, tmp_path):
    from server_helpers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    status, _, err = embed(capsys, model, folder, "-o", tmp_path / "e.parquet", "--server", url)
    assert status == 1 and err.startswith(f"cryolens: --server {url}: no server answers there")
    assert err.rstrip().endswith("start one with cryolens serve, or correct the URL")
    assert not (tmp_path / "e.parquet").exists() and not (tmp_path / "e.parquet.parts").exists()


# -- labels from a CSV file ------------------------------------------------------------------
def test_labels_csv_colours_the_map_and_keeps_the_metadata(capsys, model, folder, tmp_path):
    out = tmp_path / "e.parquet"
    assert embed(capsys, model, folder, "-o", out)[0] == 0
    labels = tmp_path / "labels.csv"
    labels.write_text("source,class,score\np0.mrc,ribosome,0.5\np1.mrc,ribosome,1\n"
                      f"{folder / 'p2.mrc'},proteasome,2\n")
    picture = tmp_path / "map.png"
    status, printed, _ = cli(capsys, "map", out, "-o", picture, "--labels", labels,
                             "--dims", "affinity", "--no-umap")
    assert status == 0 and picture.read_bytes()[:4] == b"\x89PNG"
    assert printed.rstrip().endswith(f"coloured by class; 1 without a label in {labels}")
    from cryolens.embtable import read_table, with_labels

    table, added = with_labels(read_table(out), labels)
    assert added == ["class", "score"]
    assert table["class"].to_pylist() == ["ribosome", "ribosome", "proteasome", None]
    assert table["score"].to_pylist() == [0.5, 1.0, 2.0, None]
    assert json.loads(table.schema.metadata[b"cryolens"])["affinity_dims"] == 6


def test_a_labels_csv_that_matches_nothing_says_what_to_change(capsys, model, folder, tmp_path):
    out = tmp_path / "e.parquet"
    assert embed(capsys, model, folder, "-o", out)[0] == 0
    labels = tmp_path / "labels.csv"
    labels.write_text("file,class\np0.mrc,ribosome\n")
    status, _, err = cli(capsys, "map", out, "--labels", labels, "--no-umap", "-o",
                         tmp_path / "m.png")
    assert status == 1 and "its first column, 'file', is not a column of" in err
    assert "name the column to match on first: source" in err
    labels.write_text("source,class\np0.mrc,ribosome\n")  # the hint, followed
    assert cli(capsys, "map", out, "--labels", labels, "--no-umap", "-o",
               tmp_path / "m.png")[0] == 0


@given(st.lists(st.one_of(st.none(), st.sampled_from([f"run_{i}" for i in range(30)])),
                min_size=1, max_size=80))
def test_a_legend_has_at_most_ten_entries_covering_every_point_once(values):
    from cryolens.plots import MAX_CATEGORIES, legend_groups

    groups = legend_groups(np.asarray(values, dtype=object))
    assert 1 <= len(groups) <= MAX_CATEGORIES
    masks = np.array([mask for _, mask, _ in groups])
    assert (masks.sum(0) == 1).all()
    assert all(len(name) <= 28 or name.startswith("other") for name, _, _ in groups)


def test_the_default_colour_of_a_folder_is_one_colour(capsys, model, folder, tmp_path):
    out = tmp_path / "e.parquet"
    assert embed(capsys, model, folder, "-o", out)[0] == 0
    status, printed, _ = cli(capsys, "map", out, "-o", tmp_path / "m.png", "--no-umap")
    assert status == 0 and printed.rstrip().endswith("coloured by nothing (one colour)")


# -- the console's small truths ---------------------------------------------------------------
def test_one_registry_lists_every_command():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert tuple(sub.choices) == COMMANDS


def test_the_library_imports_no_command():
    code = ("import sys, cryolens.batch, cryolens.store, cryolens.h5layout; "
            "print([m for m in sys.modules if m.startswith('cryolens.commands')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    assert done.stdout.strip() == "[]"


def test_info_json_and_no_confusing_v001_line(capsys):
    status, out, _ = cli(capsys, "info", "demo", "--json")
    facts = json.loads(out)
    assert status == 0 and facts["name"] == "demo" and facts["registry"] == "demo"
    status, out, _ = cli(capsys, "info", "demo")
    assert status == 0 and "published v001" not in out
    assert "registry     demo: " in out


def test_info_into_a_closed_pipe_says_nothing():
    reader, writer = os.pipe()
    os.close(reader)  # `| head` that has already gone
    done = subprocess.run([sys.executable, "-m", "cryolens.cli", "info", "demo"], stdout=writer,
                          stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    os.close(writer)
    assert done.stderr == ""


@pytest.mark.parametrize("command", ["embed", "reconstruct", "show", "map", "info", "train",
                                     "evaluate"])
def test_help_has_examples_that_parse(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    examples = text.split("example")[1].splitlines()[1:]
    commands = [line.strip() for line in examples if line.strip().startswith("cryolens ")]
    assert commands, text
    for line in commands:
        parse_args(line.split()[1:])


def test_embed_help_names_cuda_n_and_the_io_extra(capsys):
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "cuda:N" in text and "pip install 'cryolens-server[io]'" in text


def test_one_particle_is_singular(capsys, model, stack, tmp_path):
    one = write_mrc(tmp_path / "one.mrc", stack[0])
    status, printed, _ = embed(capsys, model, one, "-o", tmp_path / "e.parquet")
    assert status == 0 and printed.startswith("embedded 1 particle in ")
    assert "0 edge boxes padded" in printed
    assert re.search(r"in [\d.]+ s, [\d.]+ s of it starting, loading the model", printed)


# -- the Makefile ----------------------------------------------------------------------------
def make_dry_run(venv: Path, target: str) -> str:
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "-C", str(REPO), f"VENV={venv}", target],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def test_make_serve_installs_only_what_serving_needs_and_make_test_adds_the_rest(tmp_path):
    venv = tmp_path / "venv"
    serve = make_dry_run(venv, "serve")
    assert "torch==" in serve and "-m pip install --progress-bar on -e ./client -e .\n" in serve
    assert "[dev" not in serve and "napari" not in serve and "ray" not in serve
    venv.mkdir()
    (venv / ".serve").touch()  # `make serve` was run: `make test` adds, never starts again
    os.utime(venv / ".serve", (2**31, 2**31))
    test = make_dry_run(venv, "test")
    assert "-e ./client -e '.[dev,ray]'" in test and "napari" in test
    assert "torch==" not in test and "python3 -m venv" not in test
