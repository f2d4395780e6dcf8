"""cryolens.io: every input format, source records, voxel-size and box checks, copick boxes."""
from __future__ import annotations

import numpy as np
import pytest
from io_helpers import (
    BOX,
    TOMO_SHAPE,
    make_copick_project,
    particle_stack,
    write_mrc,
)

from cryolens.errors import InputError
from cryolens.io import (
    CopickOptions,
    cut_box,
    fit_box,
    load_particles,
    open_particles,
)


@pytest.fixture(scope="module")
def stack():
    return particle_stack(5)


def test_mrc_files_folder_and_both_kinds_of_stack(tmp_path, stack):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, volume in enumerate(stack):
        write_mrc(folder / f"p{i:02d}.mrc", volume, origin=(100.0 * i, 0.0, 5.0))
    (folder / "notes.txt").write_text("not a particle")
    volumes = write_mrc(tmp_path / "volumes.mrcs", stack)  # 4-D: a volume stack
    images = write_mrc(tmp_path / "images.mrcs", stack.reshape(-1, BOX, BOX), image_stack=True)
    for source in (folder, volumes, images):
        data, records = load_particles(source)
        assert data.dtype == np.float32 and np.array_equal(data, stack), source
        assert [r.index for r in records] == (list(range(5)) if source != folder else [0] * 5)
        assert all(r.voxel_size == 10.0 and r.format == "mrc" for r in records)
    _, records = load_particles(folder)
    assert [r.source for r in records] == [str(folder / f"p{i:02d}.mrc") for i in range(5)]
    # what a folder holds besides MRC files is not read, and that is said
    np.save(folder / "more.npy", stack[:1])
    (folder / "sub").mkdir()
    (folder / ".hidden").write_text("")
    assert open_particles(folder).warnings == [(
        f"{folder}: 3 entries that are not MRC files are not read (more.npy, notes.txt, sub/); "
        "name .npy or HDF5 files, or subfolders, as sources of their own")]
    assert len(open_particles(folder)) == 5
    with pytest.warns(UserWarning, match=r"3 entries that are not MRC files are not read"):
        assert len(load_particles(folder)[0]) == 5
    assert (records[3].origin_x, records[3].origin_z) == (300.0, 5.0)
    # several sources in one go, in order
    data, records = load_particles([folder / "p01.mrc", volumes])
    assert np.array_equal(data, np.concatenate([stack[1:2], stack]))


def test_hdf5_npy_and_zarr(tmp_path, stack):
    import h5py
    import zarr

    with h5py.File(tmp_path / "one.h5", "w") as f:
        f["meta/labels"] = np.arange(5)
        f["data/particles"] = stack
        f["data/particles"].attrs["voxel_size"] = 10.0
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["a"] = stack
        f["b"] = stack[:2]
    np.save(tmp_path / "s.npy", stack)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_dataset("particles", data=stack, chunks=(1, BOX, BOX, BOX))
    group.attrs["voxel_size"] = 10.0
    for source, kind in ((tmp_path / "one.h5", "hdf5"), (tmp_path / "s.npy", "npy"),
                         (tmp_path / "s.zarr", "zarr")):
        data, records = load_particles(source)
        assert np.array_equal(data, stack), source
        assert [r.format for r in records] == [kind] * 5 and records[4].index == 4
    with pytest.raises(InputError, match="several 4-D arrays"):
        load_particles(tmp_path / "two.h5")
    data, _ = load_particles(tmp_path / "two.h5", dataset="b")
    assert np.array_equal(data, stack[:2])
    with pytest.raises(InputError, match="no array 'c'"):
        load_particles(tmp_path / "two.h5", dataset="c")


def test_voxel_size_is_checked_and_rescaled_only_when_asked(tmp_path, stack):
    fine = write_mrc(tmp_path / "fine.mrc", np.kron(stack[0], np.ones((2, 2, 2), np.float32)),
                     voxel_size=5.0)
    with pytest.raises(InputError, match=r"voxel size 5 A, but the model expects 10 A"):
        open_particles(fine)
    data, records = load_particles(fine, rescale=True)
    assert data.shape == (1, BOX, BOX, BOX) and records[0].rescaled
    assert np.corrcoef(data[0].ravel(), stack[0].ravel())[0, 1] > 0.95
    # a header that lies can be overruled; npy carries no size and is taken at the model's
    data, _ = load_particles(fine, declared_voxel_size=10.0, fit=True)
    assert data.shape == (1, BOX, BOX, BOX)
    with pytest.raises(InputError, match="voxel size 12"):
        open_particles(write_mrc(tmp_path / "a.mrc", stack[0], voxel_size=12.0))
    load_particles(write_mrc(tmp_path / "b.mrc", stack[0], voxel_size=10.04))  # within 1 %


def test_wrong_box_is_an_error_or_centre_cropped_or_padded(tmp_path, stack):
    small = write_mrc(tmp_path / "small.mrc", stack[0][4:44, 4:44, 4:44])
    with pytest.raises(InputError, match=r"box 40x40x40 voxels, but the model expects 48\^3"):
        load_particles(small)
    data, _ = load_particles(small, fit=True)
    assert np.array_equal(data[0][4:44, 4:44, 4:44], stack[0][4:44, 4:44, 4:44])
    assert np.allclose(data[0][0], stack[0][4:44, 4:44, 4:44].mean(dtype=np.float64))
    big = np.pad(stack[0], 4)
    assert np.array_equal(fit_box(big, BOX), stack[0])


def test_fit_moves_the_origin_and_records_what_it_did(tmp_path, stack):
    big = np.pad(stack[0], 8)  # 64^3
    volume = big[:, 12:52, 8:55]  # z 64 (cropped by 8 each side), y 40 (padded by 4), x 47
    source = write_mrc(tmp_path / "odd.mrc", volume, voxel_size=10.0,
                       origin=(1000.0, 2000.0, 3000.0))
    data, (record,) = load_particles(source, fit=True)
    assert np.array_equal(data[0][:, 4:44, :47], volume[8:56])
    # output voxel (z, y, x) is input voxel (z + 8, y - 4, x + 0): the corner moves with it
    assert (record.origin_x, record.origin_y, record.origin_z) == (1000.0, 1960.0, 3080.0)
    assert record.fitted_from == "64x40x47"
    assert record.padded_fraction == pytest.approx(1 - 48 * 40 * 47 / 48**3)
    _, (plain,) = load_particles(write_mrc(tmp_path / "box.mrc", stack[0]), fit=True)
    assert plain.fitted_from is None and plain.padded_fraction == 0.0


def test_a_2d_image_is_refused_even_with_fit(tmp_path, stack):
    image = write_mrc(tmp_path / "twod.mrc", stack[0][24])  # one 48x48 section
    with pytest.raises(InputError, match=r"twod.mrc: particles of 1x48x48 voxels are 2-D "
                                         "images, not 3-D volumes"):
        open_particles(image, fit=True)
    np.save(tmp_path / "images.npy", stack[:, :1])  # (5, 1, 48, 48)
    with pytest.raises(InputError, match="2-D images, not 3-D volumes"):
        open_particles(tmp_path / "images.npy", fit=True)


def test_mrc_is_strict_unless_permissive(tmp_path, stack):
    path = write_mrc(tmp_path / "bad.mrc", stack[0])
    raw = bytearray(path.read_bytes())
    raw[208:212] = b"XXXX"  # the MAP marker
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="not a valid MRC file"):
        open_particles(path)
    with pytest.warns(RuntimeWarning):
        data, _ = load_particles(path, permissive=True)
    assert np.array_equal(data[0], stack[0])


def test_mrc_truncated_or_big_endian(tmp_path, stack):
    import mrcfile

    path = write_mrc(tmp_path / "cut.mrc", stack[0])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="but the file holds"):
        open_particles(path)
    big = tmp_path / "big.mrc"
    with mrcfile.new(big) as mrc:
        mrc.set_data(stack[0].astype(">f4"))
        mrc.voxel_size = 10.0
    with mrcfile.open(big) as mrc:
        assert mrc.header.mode.dtype.byteorder == ">"
    data, records = load_particles(big)
    assert np.array_equal(data[0], stack[0]) and records[0].voxel_size == 10.0


def test_unreadable_mrc_files_are_skipped_and_named_only_when_asked(tmp_path, stack):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        write_mrc(folder / f"p{i}.mrc", stack[i])
    cut = folder / "p1.mrc"
    cut.write_bytes(cut.read_bytes()[:-100])  # a copy that stopped half way
    (folder / "p3.mrc").write_bytes(b"")  # an empty file with an MRC name
    with pytest.raises(InputError, match="p1.mrc: not a valid MRC file"):
        open_particles(folder)
    particles = open_particles(folder, skip_unreadable=True)
    assert particles.skipped == [str(cut), str(folder / "p3.mrc")]
    assert [r.source for r in particles.records] == [str(folder / "p0.mrc"),
                                                     str(folder / "p2.mrc")]
    assert len(particles.warnings) == 2
    assert particles.warnings[0].startswith(f"skipped {cut}: not a valid MRC file")
    with pytest.warns(UserWarning) as caught:  # load_particles has no set to keep them in
        data, _ = load_particles([folder, tmp_path / "mixed" / "p0.mrc"], skip_unreadable=True)
    assert np.array_equal(data, stack[[0, 2, 0]])
    assert [str(w.message) for w in caught] == particles.warnings
    # a wrong voxel size is not unreadable: it stays an error that names the fix
    write_mrc(folder / "p4.mrc", stack[4], voxel_size=20.0)
    with pytest.raises(InputError, match="voxel size 20"):
        open_particles(folder, skip_unreadable=True)
    # nothing left to read is an error, not an empty set
    with pytest.raises(InputError, match="all 2 MRC files were unreadable"):
        open_particles([cut, folder / "p3.mrc"], skip_unreadable=True)


def test_many_skipped_files_are_summed_up_after_ten(tmp_path, stack):
    folder = tmp_path / "many"
    folder.mkdir()
    write_mrc(folder / "good.mrc", stack[0])
    for i in range(12):
        (folder / f"bad{i:02d}.mrc").write_bytes(b"not an MRC file")
    particles = open_particles(folder, skip_unreadable=True)
    assert len(particles) == 1 and len(particles.skipped) == 12
    assert len(particles.warnings) == 11
    assert particles.warnings[-1] == "skipped 2 more unreadable MRC files (12 in all)"


def write_transposed_mrc(path, volume, mapping):
    """``volume`` (z, y, x) stored with columns, rows and sections along the axes ``mapping``
    = (mapc, mapr, maps) names (1 = x, 2 = y, 3 = z), the header saying so."""
    import mrcfile

    mapc, mapr, maps = mapping
    stored = volume.transpose(*(3 - axis for axis in (maps, mapr, mapc)))
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(stored, np.float32))
        mrc.voxel_size = 10.0
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = mapc, mapr, maps
    return path


@pytest.mark.parametrize("mapping", [(3, 2, 1), (2, 3, 1), (3, 1, 2)])
def test_mrc_axis_order_from_the_header_is_read_as_z_y_x(tmp_path, stack, mapping):
    from cryolens import formats

    volume = stack[0]
    standard = write_mrc(tmp_path / "standard.mrc", volume)
    moved = write_transposed_mrc(tmp_path / "moved.mrc", volume, mapping)
    assert not np.array_equal(mrcfile_data(moved), volume)  # stored otherwise
    want, _ = load_particles(standard)
    for permissive in (False, True):
        got, _ = load_particles(moved, permissive=permissive)
        assert np.array_equal(got, want) and np.array_equal(got[0], volume)
    assert np.array_equal(formats.read_mrc(moved.read_bytes()).data, volume)
    # not cubic: the box that --fit sees is the z, y, x one
    block = volume[:40, :44, :]
    moved = write_transposed_mrc(tmp_path / "block.mrc", block, mapping)
    with pytest.raises(InputError, match="box 40x44x48 voxels"):
        load_particles(moved)
    assert np.array_equal(formats.read_mrc(moved.read_bytes()).data, block)


def test_mrc_axis_order_that_is_not_a_permutation_is_an_error(tmp_path, stack):
    import mrcfile

    bad = write_transposed_mrc(tmp_path / "bad.mrc", stack[0], (1, 2, 3))
    with mrcfile.open(bad, mode="r+") as mrc:
        mrc.header.mapr = 1
    with pytest.raises(InputError, match=r"axis order \(mapc, mapr, maps\) = \(1, 1, 3\) is "
                                         "not a permutation"):
        open_particles(bad)


def mrcfile_data(path):
    import mrcfile

    with mrcfile.open(path) as mrc:
        return np.array(mrc.data)


def test_unknown_sources_are_clear_errors(tmp_path):
    (tmp_path / "x.txt").write_text("not particles")
    with pytest.raises(InputError, match="cannot read particles"):
        open_particles(tmp_path / "x.txt")
    with pytest.raises(InputError, match="y.txt: no such file or folder"):
        open_particles(tmp_path / "y.txt")  # missing: said before its kind
    with pytest.raises(InputError, match="no such file"):
        open_particles(tmp_path / "missing.mrc")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no MRC files"):
        open_particles(tmp_path / "empty")


def test_batches_stream_in_order_skip_done_and_surface_errors(tmp_path, stack):
    np.save(tmp_path / "s.npy", stack)
    particles = open_particles(tmp_path / "s.npy")
    for prefetch in (0, 2):
        got = list(particles.batches(2, prefetch=prefetch))
        assert [len(b) for b in got] == [2, 2, 1]
        assert np.array_equal(np.concatenate([b.particles for b in got]), stack)
    skip = {particles.records[i].key for i in (0, 1, 3)}
    got = list(particles.batches(2, skip=skip))
    assert [r.index for b in got for r in b.records] == [2, 4]

    def broken(items):
        raise OSError("disk gone")

    particles.read = broken
    with pytest.raises(OSError, match="disk gone"):
        list(particles.batches(2))


def test_cut_box_pads_with_the_fill_value():
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    box = cut_box(data, (-2, 3, 4), 4, fill=-1.0)
    assert np.array_equal(box[2:, :3, :3], data[:2, 3:6, 4:7])
    assert (box[:2] == -1).all() and (box[:, 3:] == -1).all()
    assert (cut_box(data, (10, 10, 10), 4, 7.0) == 7).all()


# -- copick ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_copick_project(tmp_path_factory.mktemp("copick"))


def test_copick_boxes_round_pad_flag_and_keep_their_source(project):
    config, tomograms = project
    data, records = load_particles(config, copick=CopickOptions(object="ribosome"))
    assert [(r.run, r.index) for r in records] == [("TS_1", 0), ("TS_1", 1), ("TS_1", 2),
                                                   ("TS_2", 0)]
    first = records[0]
    # full position: location + the transform's shift; voxels by rounding, not truncation
    assert (first.x_angstrom, first.y_angstrom, first.z_angstrom) == (485.0, 476.0, 314.0)
    assert (first.x_voxel, first.y_voxel, first.z_voxel) == (49, 48, 31)
    assert not first.edge and first.padded_fraction == 0.0
    z, y, x = 31, 48, 49
    h = BOX // 2
    assert np.array_equal(data[0], tomograms["TS_1"][z - h:z + h, y - h:y + h, x - h:x + h])
    assert (first.origin_x, first.origin_y, first.origin_z) == (250.0, 240.0, 70.0)
    # the corner pick: 5 A -> voxel 0.5 -> 1; padded with the tomogram's mean and flagged
    corner = records[1]
    assert (corner.x_voxel, corner.y_voxel, corner.z_voxel) == (1, 1, 1)
    assert corner.edge and corner.padded_fraction == pytest.approx(1 - (25 / 48) ** 3)
    mean = tomograms["TS_1"].mean(dtype=np.float64)
    assert np.allclose(data[1][:23], mean) and np.array_equal(
        data[1][23:, 23:, 23:], tomograms["TS_1"][:25, :25, :25])
    far = records[2]
    assert far.edge and far.x_voxel == 94 and 0 < far.padded_fraction < 0.5
    assert all(r.object == "ribosome" and r.user_id == "tester" and r.session_id == "0"
               and r.voxel_size == 10.0 and r.tomo_type == "wbp" for r in records)
    assert data.shape == (4, BOX, BOX, BOX)


def test_copick_nearest_spacing_runs_and_rescale(project):
    config, _ = project
    options = CopickOptions(object="ribosome", voxel_spacing=13.0, runs=("TS_2",))
    _, records = load_particles(config, copick=options)
    assert [r.run for r in records] == ["TS_2"] and records[0].voxel_size == 10.0
    assert open_particles(config, copick=options).warnings == [  # and it says so
        "run TS_2: no tomogram at 13 A; the nearest, 10 A, is used"]
    assert open_particles(config, copick=CopickOptions(
        object="ribosome", voxel_spacing=10.0, runs=("TS_2",))).warnings == []
    with pytest.raises(InputError, match="voxel size 20 A"):  # TS_1's nearest is 20 A
        open_particles(config, copick=CopickOptions(object="ribosome", voxel_spacing=19.0,
                                                    runs=("TS_1",)))
    data, records = load_particles(config, rescale=True, copick=CopickOptions(
        object="ribosome", voxel_spacing=19.0, runs=("TS_1",)))
    assert data.shape == (3, BOX, BOX, BOX) and all(r.rescaled for r in records)
    assert records[0].voxel_size == 20.0 and records[0].x_voxel == 24  # 485 / 20 = 24.25
    with pytest.raises(InputError, match="--object"):
        open_particles(config)
    with pytest.raises(InputError, match="no object 'virus'"):
        open_particles(config, copick=CopickOptions(object="virus"))


def test_copick_reads_each_tomogram_once(project, monkeypatch):
    import zarr

    config, _ = project
    particles = open_particles(config, copick=CopickOptions(object="ribosome"))
    reader = particles.readers[0]
    opened = []
    real = zarr.open

    def counting(store, *args, **kwargs):
        opened.append(store)
        return real(store, *args, **kwargs)

    monkeypatch.setattr(zarr, "open", counting)  # every zarr array the reader opens
    batches = list(particles.batches(1))
    assert len(batches) == 4 and len(opened) == 2  # TS_1 once for 3 picks, TS_2 once
    assert reader.tomograms["TS_1"][2] == TOMO_SHAPE
