"""Particle tables (RELION/Warp STAR, Dynamo .tbl, IMOD .mod) written by the teamtomo libraries
for generated tomograms with particles at known voxels: every convention lands on the centre
voxel, embeddings equal the engine's on boxes cut by hand, exports read back to the same voxels,
and malformed tables get one line naming the row."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_helpers import write_mrc

pd = pytest.importorskip("pandas")
starfile = pytest.importorskip("starfile")
dynamotable = pytest.importorskip("dynamotable")
imodmodel = pytest.importorskip("imodmodel")

from cryolens.cli import main
from cryolens.errors import InputError
from cryolens.io import TableOptions, open_particles
from cryolens.tables import read_table
from cryolens.tables.conventions import relion_matrices
from cryolens.tables.export import export_rows

VOXEL = 10.0
BOX = 48
SHAPES = {"TS_01": (40, 72, 88), "TS_02": (36, 64, 80)}  # z, y, x voxels
#: (tomogram, centre voxel x, y, z, sub-voxel offset): the last one's box runs over the edge.
PARTICLES = [("TS_01", (30, 35, 20), (0.3, -0.2, 0.45)),
             ("TS_02", (40, 30, 18), (-0.4, 0.1, 0.0)),
             ("TS_01", (60, 40, 22), (0.0, 0.49, -0.49)),
             ("TS_01", (3, 70, 38), (0.2, 0.0, 0.1))]
CENTRES = np.array([c for _, c, _ in PARTICLES])
POSITIONS = CENTRES + np.array([o for _, _, o in PARTICLES])  # continuous, voxel centres at ints
NAMES = [t for t, _, _ in PARTICLES]
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def tomograms(tmp_path_factory):
    """Noise with a blob of its own size at each particle, one MRC file per tomogram."""
    root = tmp_path_factory.mktemp("tomograms")
    rng = np.random.default_rng(3)
    data = {}
    for name, shape in SHAPES.items():
        volume = rng.standard_normal(shape).astype(np.float32)
        grid = np.indices(shape).astype(np.float32)
        for k, (tomo, (x, y, z), _) in enumerate(PARTICLES):
            if tomo == name:
                r2 = (grid[0] - z) ** 2 + (grid[1] - y) ** 2 + (grid[2] - x) ** 2
                volume -= 3 * np.exp(-r2 / (2 * (2 + k) ** 2))
        write_mrc(root / f"{name}.mrc", volume, VOXEL)
        data[name] = volume
    return root, data


def hand_box(volume: np.ndarray, centre) -> np.ndarray:
    """The 48^3 box about ``centre`` (x, y, z), cut index by index; past the edge, the mean."""
    out = np.full((BOX,) * 3, volume.mean(dtype=np.float64), np.float32)
    x0, y0, z0 = (c - BOX // 2 for c in centre)
    for k in range(BOX):
        z = z0 + k
        if not 0 <= z < volume.shape[0]:
            continue
        for j in range(BOX):
            y = y0 + j
            if 0 <= y < volume.shape[1]:
                xs = [x for x in range(x0, x0 + BOX) if 0 <= x < volume.shape[2]]
                out[k, j, xs[0] - x0:xs[-1] - x0 + 1] = volume[z, y, xs[0]:xs[-1] + 1]
    return out


def padded_fraction(shape, centre) -> float:
    """The part of the 48^3 box about ``centre`` (x, y, z) outside a tomogram of ``shape``."""
    inside = 1
    for n, c in zip(shape, centre[::-1], strict=True):
        inside *= len([v for v in range(c - BOX // 2, c + BOX // 2) if 0 <= v < n])
    return 1 - inside / BOX**3


# -- tables as each program writes them ----------------------------------------------------------
def _shape_xyz(name):
    return np.array(SHAPES[name][::-1], np.float64)


def relion5(root: Path, tomograms: Path):
    """RELION 5: centred angstrom, origin shifts in a rotated subtomogram frame."""
    origin = RNG.uniform(-30, 30, (len(PARTICLES), 3))
    angles = RNG.uniform(-180, 180, (len(PARTICLES), 3))
    shifts = np.einsum("nij,nj->ni", relion_matrices(*angles.T), origin)
    centred = np.array([(p - _shape_xyz(t) / 2) * VOXEL
                        for t, p in zip(NAMES, POSITIONS, strict=True)]) + shifts
    frame = pd.DataFrame({"rlnTomoName": NAMES,
                          "rlnTomoParticleName": [f"{t}/{i + 1}" for i, t in enumerate(NAMES)],
                          **{f"rlnCenteredCoordinate{a}Angst": centred[:, k]
                             for k, a in enumerate("XYZ")},
                          **{f"rlnOrigin{a}Angst": origin[:, k] for k, a in enumerate("XYZ")},
                          **{f"rlnTomoSubtomogram{n}": angles[:, k]
                             for k, n in enumerate(("Rot", "Tilt", "Psi"))}})
    path = root / "relion5.star"
    starfile.write({"particles": frame}, path, overwrite=True)
    return [path], tomograms


def relion4(root: Path, tomograms: Path):
    """RELION 4: pixels of the unbinned tilt series (optics), minus shifts in angstrom."""
    pixel = 1.35
    origin = RNG.uniform(-30, 30, (len(PARTICLES), 3))
    coords = (POSITIONS * VOXEL + origin) / pixel
    frame = pd.DataFrame({"rlnTomoName": NAMES, "rlnOpticsGroup": 1,
                          **{f"rlnCoordinate{a}": coords[:, k] for k, a in enumerate("XYZ")},
                          **{f"rlnOrigin{a}Angst": origin[:, k] for k, a in enumerate("XYZ")}})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnTomoTiltSeriesPixelSize": [pixel]})
    path = root / "relion4.star"
    starfile.write({"optics": optics, "particles": frame}, path, overwrite=True)
    return [path], tomograms


def warp(root: Path, tomograms: Path):
    """Warp (RELION 3 style): rlnMicrographName, detector pixel size, Warp's tomogram names."""
    folder = root / "warp_tomograms"
    folder.mkdir()
    for name in SHAPES:
        shutil.copy(tomograms / f"{name}.mrc", folder / f"{name}_10.00Apx.mrc")
    coords = POSITIONS * VOXEL / 5.0
    frame = pd.DataFrame({"rlnMicrographName": [f"{t}.tomostar" for t in NAMES],
                          "rlnMagnification": 10000.0, "rlnDetectorPixelSize": 5.0,
                          **{f"rlnCoordinate{a}": coords[:, k] for k, a in enumerate("XYZ")}})
    path = root / "warp.star"
    starfile.write(frame, path, overwrite=True)
    return [path], folder


def dynamo(root: Path, tomograms: Path):
    """Dynamo: 1-based pixels plus shifts (columns 4-6), tomograms by number in a .doc."""
    shifts = RNG.uniform(-3, 3, (len(PARTICLES), 3))
    xyz = POSITIONS + 1 - shifts
    numbers = {"TS_01": 1, "TS_02": 2}
    frame = pd.DataFrame({"tag": np.arange(1, len(PARTICLES) + 1) * 10,
                          "dx": shifts[:, 0], "dy": shifts[:, 1], "dz": shifts[:, 2],
                          "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
                          "tomo": [numbers[t] for t in NAMES],
                          "tomo_file": [str(tomograms / f"{t}.mrc") for t in NAMES]})
    path = root / "dynamo.tbl"
    dynamotable.write(frame, str(path))
    return [path], root / "dynamo.doc"


def imod(root: Path, tomograms: Path):
    """IMOD: one model per tomogram, x and y at pixel centres + 0.5, z at the section."""
    paths = []
    for name in SHAPES:
        rows = [i for i, t in enumerate(NAMES) if t == name]
        points = POSITIONS[rows] + [0.5, 0.5, 0.0]
        frame = pd.DataFrame({"object_id": [k // 2 for k in range(len(rows))],
                              "contour_id": 0, "x": points[:, 0], "y": points[:, 1],
                              "z": points[:, 2]})
        paths.append(root / f"{name}.mod")
        imodmodel.write(frame, paths[-1])
    return paths, tomograms


CONVENTIONS = {"relion5": relion5, "relion4": relion4, "warp": warp, "dynamo": dynamo,
               "imod": imod}


def _order(convention: str) -> list[int]:
    """The particles' order in the read records: IMOD reads one model per tomogram."""
    if convention != "imod":
        return list(range(len(PARTICLES)))
    return [i for name in SHAPES for i, t in enumerate(NAMES) if t == name]


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_every_convention_lands_on_the_particles_centre_voxel(convention, tomograms, tmp_path):
    folder, data = tomograms
    sources, where = CONVENTIONS[convention](tmp_path, folder)
    particles = open_particles(sources, tables=TableOptions(tomograms=str(where)))
    try:
        batch = particles.read(particles.items)
    finally:
        particles.close()
    order = _order(convention)
    got = np.array([[r.x_voxel, r.y_voxel, r.z_voxel] for r in batch.records])
    np.testing.assert_array_equal(got, CENTRES[order])
    for k, (record, i) in enumerate(zip(batch.records, order, strict=True)):
        assert record.run == NAMES[i] or record.run.startswith(NAMES[i])
        assert record.voxel_size == VOXEL
        np.testing.assert_allclose([record.x_angstrom, record.y_angstrom, record.z_angstrom],
                                   POSITIONS[i] * VOXEL, atol=1e-6)
        np.testing.assert_array_equal(batch.particles[k], hand_box(data[NAMES[i]], CENTRES[i]))
        outside = padded_fraction(SHAPES[NAMES[i]], CENTRES[i])
        assert record.padded_fraction == pytest.approx(outside) and record.edge == (outside > 0)
    assert padded_fraction(SHAPES["TS_01"], CENTRES[3]) > padded_fraction(SHAPES["TS_01"],
                                                                          CENTRES[0])


def test_records_name_the_tables_row(tomograms, tmp_path):
    folder, _ = tomograms
    (path,), where = relion5(tmp_path, folder)
    particles = open_particles(path, tables=TableOptions(tomograms=str(where)))
    records = particles.records
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert [r.particle_name for r in records] == ["TS_01/1", "TS_02/2", "TS_01/3", "TS_01/4"]
    assert [r.format for r in records] == ["star"] * 4
    assert records[1].tomogram == str((folder / "TS_02.mrc").resolve())
    assert records[1].tomogram_shape == "36x64x80"
    assert len({r.key for r in records}) == 4


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_embeddings_from_a_table_equal_the_engines_on_boxes_cut_by_hand(
        convention, tomograms, tmp_path, demo_engine, capsys):
    from cryolens.operations import Operation, run

    folder, data = tomograms
    sources, where = CONVENTIONS[convention](tmp_path, folder)
    out = tmp_path / "emb.parquet"
    assert main(["embed", *map(str, sources), "--tomograms", str(where), "-o", str(out),
                 "-c", "demo", "--device", "cpu", "--quiet"]) == 0
    assert "embedded 4 particles" in capsys.readouterr().out
    frame = pd.read_parquet(out)
    order = _order(convention)
    boxes = np.stack([hand_box(data[NAMES[i]], CENTRES[i]) for i in order])
    want = run(demo_engine, Operation(kind="features"), boxes).arrays["embedding"]
    columns = [c for c in frame.columns if c.startswith("embedding_")]
    np.testing.assert_allclose(frame[columns].to_numpy(), want, rtol=0, atol=1e-5)
    if convention != "imod":  # IMOD counts rows per model
        assert frame["index"].tolist() == list(range(len(PARTICLES)))
    # back out as STAR and as Dynamo, and in again: the same boxes
    for suffix in (".star", ".tbl"):
        back = tmp_path / f"back{suffix}"
        assert main(["export", str(out), "-o", str(back)]) == 0
        again = open_particles(back, tables=TableOptions(
            tomograms=str(folder if suffix == ".star" else back.with_suffix(".doc"))))
        np.testing.assert_array_equal(
            [[r.x_voxel, r.y_voxel, r.z_voxel] for r in again.records], CENTRES[order])


@pytest.fixture(scope="module")
def demo_engine():
    from cryolens.engine import Engine

    return Engine.from_checkpoint("demo", device="cpu")


# -- exports read back to the same voxels ------------------------------------------------------
def _rows(centres, names, folder: Path):
    return pd.DataFrame({
        "source": "table.parquet", "index": range(len(centres)), "format": "star",
        "run": names, "voxel_size": VOXEL,
        "x_voxel": [c[0] for c in centres], "y_voxel": [c[1] for c in centres],
        "z_voxel": [c[2] for c in centres], "particle_name": None,
        "tomogram": [str(folder / f"{n}.mrc") for n in names],
        "tomogram_shape": ["x".join(map(str, SHAPES[n])) for n in names]})


@st.composite
def centres_in_tomograms(draw):
    n = draw(st.integers(1, 12))
    names = draw(st.lists(st.sampled_from(sorted(SHAPES)), min_size=n, max_size=n))
    centres = [tuple(draw(st.integers(0, size - 1)) for size in SHAPES[name][::-1])
               for name in names]
    return names, centres


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=centres_in_tomograms(), suffix=st.sampled_from([".star", ".tbl"]))
def test_exports_read_back_to_the_same_voxels(tomograms, drawn, suffix):
    folder, _ = tomograms
    names, centres = drawn
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"picks{suffix}"
        line = export_rows(_rows(centres, names, folder), out)
        assert f"wrote {len(centres)} particles" in line
        where = folder if suffix == ".star" else out.with_suffix(".doc")
        picks = read_table(out, TableOptions(tomograms=str(where)))
    got = [tuple(int(np.floor(c + 0.5)) for c in p.position) for p in picks]
    assert got == centres
    assert [p.tomogram.path.stem for p in picks] == names


def test_exported_star_is_relion5_layout_and_dynamo_reads_its_table(tomograms, tmp_path):
    folder, _ = tomograms
    rows = _rows([(44, 36, 20), (0, 0, 0)], ["TS_01", "TS_02"], folder)
    export_rows(rows, tmp_path / "p.star")
    star = starfile.read(tmp_path / "p.star")
    assert list(star["rlnTomoName"]) == ["TS_01", "TS_02"]
    # the centre voxel of an even-sized axis is n / 2: 0 A; the first voxel is -n/2 voxels
    np.testing.assert_allclose(star[["rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
                                     "rlnCenteredCoordinateZAngst"]].to_numpy(),
                               [[0, 0, 0], [-400, -320, -180]])
    export_rows(rows, tmp_path / "p.tbl")
    table = dynamotable.read(str(tmp_path / "p.tbl"), str(tmp_path / "p.doc"))
    assert table[["x", "y", "z"]].to_numpy().tolist() == [[45, 37, 21], [1, 1, 1]]
    assert table["tomo_file"].tolist() == [str(folder / "TS_01.mrc"), str(folder / "TS_02.mrc")]


def test_export_refuses_particles_not_cut_from_a_tomogram(tomograms, tmp_path):
    folder, _ = tomograms
    rows = _rows([(1, 2, 3), (4, 5, 6)], ["TS_01", "TS_01"], folder)
    rows.loc[1, ["x_voxel", "run"]] = None
    with pytest.raises(InputError, match=r"row 1 \(table.parquet particle 1\): no position"):
        export_rows(rows, tmp_path / "p.star")
    assert not (tmp_path / "p.star").exists()


# -- malformed tables: one line naming the row --------------------------------------------------
def _star(tmp_path, **columns) -> Path:
    path = tmp_path / "bad.star"
    starfile.write({"particles": pd.DataFrame(columns)}, path, overwrite=True)
    return path


@pytest.mark.parametrize("columns, message", [
    ({"rlnTomoName": ["TS_01"], "rlnCoordinateX": [1.0], "rlnCoordinateY": [1.0]},
     r"missing column rlnCoordinateZ"),
    ({"rlnCoordinateX": [1.0], "rlnCoordinateY": [1.0], "rlnCoordinateZ": [1.0]},
     r"missing column rlnTomoName"),
    ({"rlnTomoName": ["TS_01", "TS_99"], "rlnCoordinateX": [1.0, 2.0],
      "rlnCoordinateY": [1.0, 2.0], "rlnCoordinateZ": [1.0, 2.0]},
     r"bad.star row 2: no tomogram named 'TS_99'"),
    ({"rlnTomoName": ["TS_01", "TS_01"], "rlnCoordinateX": [1.0, 88.0],
      "rlnCoordinateY": [1.0, 2.0], "rlnCoordinateZ": [1.0, 2.0]},
     r"bad.star row 2: position x=88.0, y=2.0, z=2.0 voxels is outside tomogram TS_01.mrc"),
    ({"rlnTomoName": ["TS_01"], "rlnCenteredCoordinateXAngst": [0.0],
      "rlnCenteredCoordinateYAngst": ["abc"], "rlnCenteredCoordinateZAngst": [-201.0]},
     r"bad.star row 1: rlnCenteredCoordinateYAngst is 'abc', not a finite number"),
    ({"rlnTomoName": ["TS_01"], "rlnCenteredCoordinateXAngst": [0.0],
      "rlnCenteredCoordinateYAngst": [0.0], "rlnCenteredCoordinateZAngst": [-206.0]},
     r"bad.star row 1: position .* z=-0.6 voxels is outside"),
])
def test_malformed_star_tables_name_the_row(tomograms, tmp_path, columns, message):
    folder, _ = tomograms
    with pytest.raises(InputError, match=message):
        read_table(_star(tmp_path, **columns), TableOptions(tomograms=str(folder)))


def test_malformed_dynamo_and_imod_tables_name_the_row(tomograms, tmp_path):
    folder, _ = tomograms
    frame = pd.DataFrame({"x": [10, 12], "y": [10, 12], "z": [10, 12], "tomo": [1, 7]})
    dynamotable.write(frame, str(tmp_path / "t.tbl"))
    (tmp_path / "t.doc").write_text(f"1 {folder / 'TS_01.mrc'}\n")
    with pytest.raises(InputError, match=r"t.tbl row 2 \(tag 2\): tomogram 7 \(column 20\) is "
                                         r"not in the catalogue \(it lists 1\)"):
        read_table(tmp_path / "t.tbl", TableOptions(tomograms=str(tmp_path / "t.doc")))
    (tmp_path / "short.tbl").write_text("1 1 0 0 0 0\n")
    with pytest.raises(InputError, match=r"6 columns; a Dynamo table holds .* columns 24-26"):
        read_table(tmp_path / "short.tbl", TableOptions(tomograms=str(tmp_path / "t.doc")))
    imodmodel.write(pd.DataFrame({"object_id": [0], "contour_id": [0], "x": [1.0], "y": [1.0],
                                  "z": [1.0]}), tmp_path / "TS_07.mod")
    with pytest.raises(InputError, match=r"TS_07.mod row 1 \(object 1 contour 1 point 1\): no "
                                         r"tomogram named 'TS_07'"):
        read_table(tmp_path / "TS_07.mod", TableOptions(tomograms=str(folder)))
    with pytest.raises(InputError, match=r"needs its tomograms: --tomograms"):
        read_table(tmp_path / "TS_07.mod", TableOptions())


def test_the_cli_says_one_line_naming_the_row(tomograms, tmp_path, capsys):
    folder, _ = tomograms
    path = _star(tmp_path, rlnTomoName=["TS_01", "TS_02"], rlnCoordinateX=[1.0, 2.0],
                 rlnCoordinateY=[1.0, 2.0], rlnCoordinateZ=[1.0, 99.0])
    assert main(["embed", str(path), "--tomograms", str(folder), "-o",
                 str(tmp_path / "e.parquet"), "-c", "demo", "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("cryolens: ") and "bad.star row 2" in err and "outside" in err


def test_a_tomogram_at_another_voxel_size_is_refused_or_rescaled(tomograms, tmp_path):
    _, data = tomograms
    write_mrc(tmp_path / "TS_01.mrc", data["TS_01"], 20.0)
    (path,), _ = relion5(tmp_path, tmp_path)
    frame = starfile.read(path)
    starfile.write({"particles": frame[frame["rlnTomoName"] == "TS_01"]}, path, overwrite=True)
    with pytest.raises(InputError, match=r"tomogram .*TS_01.mrc \(20 A\): voxel size 20 A"):
        open_particles(path, tables=TableOptions(tomograms=str(tmp_path)))
    particles = open_particles(path, tables=TableOptions(tomograms=str(tmp_path)), rescale=True)
    batch = particles.read(particles.items[:1])
    assert batch.particles.shape == (1, BOX, BOX, BOX) and batch.records[0].rescaled
    # centred angstrom are the same place at any voxel size: 20 A voxels halve the index
    assert batch.records[0].x_voxel == int(np.floor((POSITIONS[0][0] - 44) / 2 + 44 + 0.5))


@pytest.mark.parametrize("module, suffix", [("starfile", ".star"), ("dynamotable", ".tbl"),
                                            ("imodmodel", ".mod")])
def test_a_missing_reader_says_which_extra_to_install(tomograms, tmp_path, monkeypatch, module,
                                                      suffix):
    folder, _ = tomograms
    path = tmp_path / f"TS_01{suffix}"
    path.write_text("")
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(InputError, match=rf"needs the {module} package: pip install "
                                         r"'cryolens-server\[tables\]'"):
        read_table(path, TableOptions(tomograms=str(folder / "TS_01.mrc")))
