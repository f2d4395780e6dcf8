"""The napari widget in a real viewer under Xvfb, against a real server on the demo model.

Needs napari, pytest-qt and the napari-cryolens plugin installed, and Xvfb (adding an Image
layer needs an OpenGL context: Mesa's software GL under Xvfb gives one; Qt's offscreen platform
does not). Skipped, with the reason, where any of these is missing.

``CRYOLENS_WRITE_SCREENSHOT=1`` also writes the screenshot test's picture to docs/napari.png.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="napari is not installed (pip install "
                             "'napari[pyqt6]' pytest-qt ./napari-cryolens)")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed")
pytest.importorskip("napari_cryolens", reason="napari-cryolens is not installed "
                    "(pip install ./napari-cryolens)")

from napari_cryolens import core
from server_helpers import free_port

from cryolens.client import CryoLensClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SCALE = np.array([10.0, 10.0, 10.0])
TRANSLATE = np.array([5.0, -20.0, 30.0])
SHAPE = (64, 160, 160)
WAIT_MS = 120_000


def _die_with_parent() -> None:  # Xvfb outlives the QApplication, then goes with pytest
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="session", autouse=True)
def display():
    """An Xvfb display, made before pytest-qt's session-wide QApplication (Qt's xcb platform,
    Mesa's software OpenGL). It is stopped when pytest exits, not at teardown: Qt aborts when
    its display goes away under a live QApplication."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb); napari needs a display")
    number = 90 + os.getpid() % 100
    process = subprocess.Popen([xvfb, f":{number}", "-screen", "0", "1600x1000x24",
                                "-nolisten", "tcp"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               preexec_fn=_die_with_parent)  # noqa: PLW1509 - before any thread
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.skip(f"Xvfb did not start on :{number}")
        time.sleep(0.05)
    os.environ["DISPLAY"] = f":{number}"
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    return process


@pytest.fixture(autouse=True)
def settings_file(tmp_path, monkeypatch):
    path = tmp_path / "napari-cryolens.json"
    monkeypatch.setenv("NAPARI_CRYOLENS_SETTINGS", str(path))
    return path


@pytest.fixture(scope="module")
def server(demo_server):
    """The demo model's server (conftest.py's shared process)."""
    return demo_server


def tomogram(seed: int = 0) -> np.ndarray:
    """Noise with a few synthetic particles pasted in (z, y, x)."""
    from cryolens.synth import ParticleSimulator

    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, 0.5, SHAPE).astype(np.float32)
    particles = ParticleSimulator(snr=None, seed=seed).sample(6).particles
    for i, particle in enumerate(particles):
        z, y, x = 8, 10 + 20 * i, 10 + 20 * i
        data[z:z + 48, y:y + 48, x:x + 48] += particle
    return data


PICKS = np.array([
    [32, 80, 80],        # inside
    [2, 5, 158],         # at three edges
    [63, 159, 0],        # in a corner
    [30.4, 100.6, 60.5],  # between voxels
])


def viewer_with_picks(make_napari_viewer, picks=PICKS, data=None):
    from napari_cryolens._widget import CryoLensWidget

    viewer = make_napari_viewer()
    data = tomogram() if data is None else data
    tomo = viewer.add_image(data, name="tomogram", scale=SCALE, translate=TRANSLATE,
                            colormap="gray")
    points = viewer.add_points(np.asarray(picks, float), name="picks", scale=SCALE,
                               translate=TRANSLATE, size=4)
    widget = CryoLensWidget(viewer)
    viewer.window.add_dock_widget(widget, name="CryoLens")
    return viewer, widget, tomo, points


def run_and_wait(qtbot, widget, action, *args):
    action(*args)
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def expected_box(data: np.ndarray, centre) -> np.ndarray:
    """The 48^3 box around ``centre`` cut independently of the plugin: pad, then slice."""
    padded = np.pad(data, 24, constant_values=float(data.mean(dtype=np.float64)))
    z, y, x = (int(c) for c in centre)
    return padded[z:z + 48, y:y + 48, x:x + 48]


def test_each_pick_gets_the_servers_reconstruction_in_place(make_napari_viewer, qtbot, server):
    viewer, widget, tomo, points = viewer_with_picks(make_napari_viewer)
    widget.url.setText(server.url)
    points.selected_data = {0, 1, 2, 3}
    run_and_wait(qtbot, widget, widget.reconstruct_selected)
    assert not [m for m in widget.messages if "error" in m.lower()], widget.messages
    centres = np.floor(PICKS + 0.5).astype(int)
    boxes = np.stack([expected_box(tomo.data, centre) for centre in centres])
    with CryoLensClient(server.url) as client:  # the same stack as the widget's one request
        expected = client.reconstruct(boxes)["reconstruction"]
        for index, centre in enumerate(centres):
            layer = viewer.layers[f"cryolens pick {index}"]
            assert layer.data.shape == (48, 48, 48)
            np.testing.assert_allclose(layer.scale, SCALE)
            np.testing.assert_allclose(layer.translate, (centre - 24) * SCALE + TRANSLATE)
            # napari's own transforms: the box's centre voxel lies on the pick's voxel
            np.testing.assert_allclose(layer.data_to_world((24, 24, 24)),
                                       tomo.data_to_world(centre))
            assert_same_reconstruction(layer.data, expected[index])
            alone = client.reconstruct(boxes[index])["reconstruction"]  # batching: rounding
            np.testing.assert_allclose(layer.data, alone, rtol=0, atol=1e-4)
            low, high = layer.contrast_limits
            assert low < high
            assert layer.metadata["cryolens"]["pick"] == index


def test_segments_and_predicted_pose_are_layers_of_their_own(make_napari_viewer, qtbot,
                                                             server, settings_file):
    viewer, widget, tomo, points = viewer_with_picks(make_napari_viewer)
    widget.url.setText(server.url)
    widget.segments.setChecked(True)
    widget.pose.setCurrentIndex(1)  # predicted
    widget.final_convolution.setChecked(False)
    points.selected_data = {1}
    run_and_wait(qtbot, widget, widget.reconstruct_selected)
    names = {layer.name for layer in viewer.layers}
    assert {"cryolens pick 1", "cryolens pick 1 affinity", "cryolens pick 1 free"} <= names
    centre = np.floor(PICKS[1] + 0.5).astype(int)
    with CryoLensClient(server.url) as client:
        expected = client.reconstruct(expected_box(tomo.data, centre),
                                      use_segmented_decoder=True, use_predicted_pose=True,
                                      use_final_convolution=False)
    for suffix, key in (("", "reconstruction"), (" affinity", "affinity_reconstruction"),
                        (" free", "free_reconstruction")):
        layer = viewer.layers[f"cryolens pick 1{suffix}"]
        np.testing.assert_allclose(layer.translate, (centre - 24) * SCALE + TRANSLATE)
        np.testing.assert_allclose(layer.data, expected[key], rtol=1e-5, atol=1e-6)
    # the choices are remembered
    stored = core.Settings.load(settings_file)
    assert stored.url == server.url and stored.segments and stored.use_predicted_pose
    assert not stored.final_convolution


def test_picks_whose_box_holds_nan_are_skipped_and_named(make_napari_viewer, qtbot, server):
    """A masked (NaN) region: the picks whose box reaches it are named and skipped, the rest
    reconstructed. The client refused the whole request, numbering its volumes from 0 in each
    request, and the run stopped there."""
    data = tomogram()
    data[:, :, 150:] = np.nan
    viewer, widget, _, _ = viewer_with_picks(make_napari_viewer, data=data)
    widget.url.setText(server.url)
    widget.batch_size.setValue(2)
    run_and_wait(qtbot, widget, widget.reconstruct_all)
    assert widget.messages == [("CryoLens: 1 pick(s) of 'picks' have NaN or infinity in their "
                                "box and were skipped: 1")]
    names = {layer.name for layer in viewer.layers}
    assert {"cryolens pick 0", "cryolens pick 2", "cryolens pick 3"} <= names
    assert "cryolens pick 1" not in names


def test_batch_over_many_picks_finishes_and_colours_them(make_napari_viewer, qtbot, server):
    rng = np.random.default_rng(3)
    picks = rng.uniform(0, 1, (60, 3)) * (np.array(SHAPE) - 1)
    viewer, widget, _, points = viewer_with_picks(make_napari_viewer, picks)
    widget.url.setText(server.url)
    widget.batch_size.setValue(16)
    widget.colour.setChecked(True)
    run_and_wait(qtbot, widget, widget.reconstruct_all)
    assert widget.progress.value() == widget.progress.maximum() == 60
    assert sum(layer.name.startswith("cryolens pick ") for layer in viewer.layers) == 60
    assert len(widget.embeddings["picks"]) == 60
    colours = points.face_color
    assert len(np.unique(np.round(colours, 3), axis=0)) > 10  # coloured by their embeddings


def assert_same_reconstruction(shown: np.ndarray, expected: np.ndarray) -> None:
    """The widget asks for segments too; with them the server's volume is the clamped sum of the
    affinity and free renders, the plain render's value up to float32 summation order: equal to
    1e-4 of the volume's range (spec.md's parity tolerance is 1e-5 of it against the
    reference)."""
    np.testing.assert_allclose(shown, expected, rtol=0,
                               atol=1e-4 * max(float(np.ptp(expected)), 1e-12))


def test_all_picks_in_one_layer(make_napari_viewer, qtbot, server):
    picks = np.array([[32, 40, 40], [32, 120, 120], [2, 5, 158]])  # boxes apart, one at edges
    viewer, widget, tomo, _ = viewer_with_picks(make_napari_viewer, picks)
    widget.url.setText(server.url)
    widget.combined.setChecked(True)
    run_and_wait(qtbot, widget, widget.reconstruct_all)
    assert not any(layer.name.startswith("cryolens pick ") for layer in viewer.layers)
    layer = viewer.layers["cryolens all picks (picks)"]
    assert layer.data.shape == SHAPE
    np.testing.assert_allclose(layer.scale, SCALE)
    np.testing.assert_allclose(layer.translate, TRANSLATE)
    boxes = np.stack([expected_box(tomo.data, c) for c in picks])
    with CryoLensClient(server.url) as client:
        expected = client.reconstruct(boxes)["reconstruction"]
    for volume, (z, y, x) in zip(expected, picks, strict=True):
        canvas = np.pad(layer.data, 24, constant_values=np.nan)[z:z + 48, y:y + 48, x:x + 48]
        inside = ~np.isnan(canvas)
        assert_same_reconstruction(canvas[inside], volume[inside])


def test_batch_can_be_cancelled(make_napari_viewer, qtbot, server):
    rng = np.random.default_rng(4)
    picks = rng.uniform(0, 1, (120, 3)) * (np.array(SHAPE) - 1)
    viewer, widget, _, _ = viewer_with_picks(make_napari_viewer, picks)
    widget.url.setText(server.url)
    widget.batch_size.setValue(4)
    widget.reconstruct_all()
    qtbot.waitUntil(lambda: widget.progress.value() > 0, timeout=WAIT_MS)
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    done = sum(layer.name.startswith("cryolens pick ") for layer in viewer.layers)
    # The worker fetches at most two chunks (of 4) ahead of what the viewer has shown, so the
    # run stops within a few chunks of the click, however slow the viewer or fast the server.
    print(f"picks done before the cancel took: {done}")
    assert 0 < done <= 4 * 6
    assert widget.progress.value() == done


class InstantBackend:
    """Answers every box at once with an empty reconstruction: the widget's side alone."""

    url = "instant"

    def reconstruct(self, boxes, options):
        return {"reconstruction": np.zeros((len(boxes), 48, 48, 48), np.float32)}


class HeldBackend(InstantBackend):
    """Answers once ``release`` is set: a run that goes on while the test acts."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def reconstruct(self, boxes, options):
        self.release.wait(WAIT_MS / 1000)
        return super().reconstruct(boxes, options)


def test_picks_queued_during_a_run_cost_one_comparison_each(make_napari_viewer, qtbot):
    """Pressing Reconstruct all again during a run over thousands of picks queues them: that
    compared each with every one queued before it (3.8 s of frozen viewer for 20 000)."""

    class Index(int):
        compared = 0

        def __eq__(self, other):
            Index.compared += 1
            return int.__eq__(self, other)

        __hash__ = int.__hash__

    _, widget, _, _ = viewer_with_picks(make_napari_viewer)
    held = HeldBackend()
    widget.backend = lambda: held
    widget.reconstruct([0])
    try:
        for _ in range(2):
            widget.reconstruct([Index(i) for i in range(3000)])
    finally:
        held.release.set()
    assert Index.compared <= 2 * 3000
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert sum(layer.name.startswith("cryolens pick ") for layer in widget.viewer.layers) == 4


def test_the_viewer_turns_between_picks_layers(make_napari_viewer, qtbot):
    """napari takes ~0.2 s to add an Image layer: a chunk of 16 added in one go froze the
    viewer for 3-7 s. Each pick's layers are added in a turn of the event loop of their own."""
    from qtpy.QtCore import QTimer

    rng = np.random.default_rng(5)
    picks = rng.uniform(0, 1, (12, 3)) * (np.array(SHAPE) - 1)
    viewer, widget, _, _ = viewer_with_picks(make_napari_viewer, picks)
    widget.backend = InstantBackend
    widget.batch_size.setValue(12)  # one chunk
    turns = [0]
    ticker = QTimer()
    ticker.timeout.connect(lambda: turns.__setitem__(0, turns[0] + 1))
    ticker.start(0)
    added_at = []
    viewer.layers.events.inserted.connect(lambda event: added_at.append(turns[0]))
    run_and_wait(qtbot, widget, widget.reconstruct_all)
    ticker.stop()
    assert len(added_at) == 12 and widget.progress.value() == 12
    assert (np.diff(added_at) > 0).all(), added_at  # the event loop turned between any two


def test_closing_the_viewer_mid_run_ends_the_worker(make_napari_viewer, qtbot):
    """napari asks a closing window's workers to quit (and waits for every worker when the
    application quits): a worker waiting for the viewer to show its chunks must still stop."""
    rng = np.random.default_rng(4)
    picks = rng.uniform(0, 1, (40, 3)) * (np.array(SHAPE) - 1)
    viewer, widget, _, _ = viewer_with_picks(make_napari_viewer, picks)
    widget.backend = InstantBackend
    widget.batch_size.setValue(1)
    widget.reconstruct_all()
    worker, job = widget.worker, widget._job
    ended = []
    worker.finished.connect(lambda: ended.append(True))
    qtbot.waitUntil(lambda: widget.progress.value() > 0, timeout=WAIT_MS)
    viewer.close()  # the widget goes with it: nothing shows the chunks the worker fetched
    try:
        qtbot.waitUntil(lambda: bool(ended), timeout=10_000)
    finally:
        job.cancelled.set()  # without the fix, lets the stuck worker go (pytest would hang)
        qtbot.waitUntil(lambda: bool(ended), timeout=10_000)


def test_a_down_server_is_a_message_not_a_traceback(make_napari_viewer, qtbot):
    from napari.utils.notifications import notification_manager

    _, widget, _, points = viewer_with_picks(make_napari_viewer)
    url = f"http://127.0.0.1:{free_port()}"
    widget.url.setText(url)
    points.selected_data = {0}
    run_and_wait(qtbot, widget, widget.reconstruct_selected)
    assert widget.messages[-1].startswith(f"CryoLens: could not reach the server at {url}")
    assert "Traceback" not in widget.messages[-1]
    assert any(str(r.message).startswith("CryoLens: could not reach")
               for r in notification_manager.records)


def test_no_picks_is_a_message_not_an_endless_progress_bar(make_napari_viewer, qtbot):
    _, widget, _, _ = viewer_with_picks(make_napari_viewer, np.zeros((0, 3)))
    widget.reconstruct_all()
    assert not widget.busy
    assert widget.messages == ["CryoLens: no picks to reconstruct in 'picks'"]
    assert widget.progress.maximum() > 0  # a range of 0..0 is Qt's endless busy indicator


def test_progress_counts_the_picks_that_exist(make_napari_viewer, qtbot):
    _, widget, _, _ = viewer_with_picks(make_napari_viewer)
    widget.url.setText(f"http://127.0.0.1:{free_port()}")  # nothing there: a quick failure
    run_and_wait(qtbot, widget, widget.reconstruct, [0, 2, 99])  # 99: since removed
    assert widget.progress.maximum() == 2


def test_picks_outside_the_tomogram_are_skipped_and_named(make_napari_viewer, qtbot):
    picks = [[32, 80, 80], [500, 80, 80], [32, -30, 80], [63.4, 159.4, -0.4]]  # last: inside
    _, widget, _, _ = viewer_with_picks(make_napari_viewer, picks)
    widget.url.setText(f"http://127.0.0.1:{free_port()}")  # nothing there: a quick failure
    run_and_wait(qtbot, widget, widget.reconstruct_all)
    assert widget.messages[0] == ("CryoLens: 2 pick(s) of 'picks' lie outside the tomogram "
                                  "'tomogram' and were skipped: 1, 2")
    assert widget.progress.maximum() == 2


def test_renamed_layers_stay_chosen(make_napari_viewer, qtbot):
    viewer, widget, tomo, points = viewer_with_picks(make_napari_viewer)
    viewer.add_image(np.zeros((8, 8, 8), np.float32), name="another tomogram")
    viewer.add_points(np.zeros((1, 3)), name="other picks")
    widget.tomogram.setCurrentText("tomogram")
    widget.picks.setCurrentText("picks")
    tomo.name = "TS_01"
    points.name = "ribosomes"
    assert (widget.tomogram.currentText(), widget.picks.currentText()) == ("TS_01", "ribosomes")
    widget.url.setText(f"http://127.0.0.1:{free_port()}")  # nothing there: a quick failure
    points.selected_data = {0}
    run_and_wait(qtbot, widget, widget.reconstruct_selected)
    assert widget.messages[-1].startswith("CryoLens: could not reach the server")


def test_the_fill_value_is_computed_off_the_gui_thread_once(make_napari_viewer, qtbot,
                                                           monkeypatch, server):
    """A lazy tomogram's fill value reads a sample of all of it (1.1 s for a 200x1000x1000
    zarr array on local disk): that is worker work, done once per tomogram."""
    threads = []

    def fill_value(data):
        threads.append(threading.current_thread())
        return float(np.mean(data, dtype=np.float64))

    monkeypatch.setattr(core, "fill_value", fill_value)
    _, widget, _, points = viewer_with_picks(make_napari_viewer)
    widget.url.setText(server.url)
    for pick in (0, 1):
        points.selected_data = {pick}
        run_and_wait(qtbot, widget, widget.reconstruct_selected)
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    assert "cryolens pick 1" in widget.viewer.layers


def test_rotated_sheared_or_affine_layers_are_refused_not_misplaced(make_napari_viewer, qtbot):
    """Boxes are cut and placed by scale and translate: with a rotation the box was cut around
    another voxel (the pick at voxel (32, 80, 80) of a tomogram rotated 30 degrees got the box
    around (32, 29, 109)), and the reconstruction drawn unrotated."""
    _, widget, tomo, points = viewer_with_picks(make_napari_viewer)
    tomo.rotate = 30
    widget.reconstruct_all()
    assert not widget.busy
    assert widget.messages[-1] == (
        "CryoLens: layer 'tomogram' is rotated, sheared or has an affine transform; boxes are "
        "cut and placed by scale and translate only, so set it to the identity first")
    tomo.rotate = 0
    points.affine = np.diag([1.0, 2.0, 1.0, 1.0])
    widget.reconstruct_all()
    assert not widget.busy and "layer 'picks' is rotated" in widget.messages[-1]


def test_a_2d_points_layer_is_not_offered_and_the_message_says_why(make_napari_viewer, qtbot):
    """A Points layer made while the viewer showed only 2-D layers is 2-D: it is in the layer
    list but not in the widget's chooser."""
    from napari_cryolens._widget import CryoLensWidget

    viewer = make_napari_viewer()
    viewer.add_points(np.zeros((3, 2)), name="picks")
    viewer.add_image(tomogram(), name="tomogram")
    widget = CryoLensWidget(viewer)
    assert widget.picks.count() == 0
    widget.reconstruct_all()
    assert widget.messages[-1] == ("CryoLens: choose a 3-D (z, y, x) Points layer of picks "
                                   "first; 2-D and 4-D ones are not offered")


def test_each_layer_is_watched_for_renames_once(make_napari_viewer, qtbot, monkeypatch):
    """Not every layer again at every insertion: with a layer per pick that is quadratic."""
    from napari.utils.events import EventEmitter

    viewer, widget, _, _ = viewer_with_picks(make_napari_viewer)
    connected = []
    connect = EventEmitter.connect

    def counting(emitter, callback, *args, **kwargs):
        if callback == widget.refresh_layers:
            connected.append(emitter)
        return connect(emitter, callback, *args, **kwargs)

    monkeypatch.setattr(EventEmitter, "connect", counting)
    for i in range(30):
        viewer.add_image(np.zeros((4, 4, 4), np.float32), name=f"cryolens pick {i}")
    assert len(connected) == 30


def test_a_mistyped_url_is_a_message_and_the_widget_stays_usable(make_napari_viewer, qtbot):
    _, widget, _, points = viewer_with_picks(make_napari_viewer)
    widget.url.setText("localhost:8023")  # no http://
    points.selected_data = {0}
    widget.reconstruct_selected()
    assert "url must be the server's http:// or https:// address" in widget.messages[-1]
    assert not widget.busy
    assert widget.check_button.isEnabled() and not widget.cancel_button.isEnabled()
    widget.check_button.click()
    assert len(widget.messages) == 2 and "got 'localhost:8023'" in widget.messages[-1]


def test_a_server_error_shows_the_servers_message(make_napari_viewer, qtbot, server):
    _, widget, _, points = viewer_with_picks(make_napari_viewer)
    widget.url.setText(server.url + "/no-such-prefix")
    points.selected_data = {0}
    run_and_wait(qtbot, widget, widget.reconstruct_selected)
    assert widget.messages[-1].startswith("CryoLens server error 404: Not Found")


def test_live_picking_reconstructs_each_new_pick(make_napari_viewer, qtbot, server):
    viewer, widget, _tomo, points = viewer_with_picks(make_napari_viewer, PICKS[:1])
    widget.url.setText(server.url)
    widget.live.setChecked(True)
    points.add(np.array([20.0, 40.0, 120.0]))  # as a click in add mode does
    qtbot.waitUntil(lambda: "cryolens pick 1" in viewer.layers, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    layer = viewer.layers["cryolens pick 1"]
    np.testing.assert_allclose(layer.translate, (np.array([20, 40, 120]) - 24) * SCALE
                               + TRANSLATE)
    assert "cryolens pick 0" not in viewer.layers  # only the new one
    assert len(widget.latencies) == 1


def test_local_mode_matches_the_server(make_napari_viewer, qtbot, server):
    pytest.importorskip("torch", reason="local mode needs PyTorch")
    viewer, widget, tomo, points = viewer_with_picks(make_napari_viewer)
    widget.mode.setCurrentIndex(1)  # local engine, checkpoint demo
    assert widget.checkpoint.text() == "demo"
    points.selected_data = {2}
    run_and_wait(qtbot, widget, widget.reconstruct_selected)
    assert not [m for m in widget.messages if "error" in m.lower()], widget.messages
    centre = np.floor(PICKS[2] + 0.5).astype(int)
    layer = viewer.layers["cryolens pick 2"]
    np.testing.assert_allclose(layer.translate, (centre - 24) * SCALE + TRANSLATE)
    with CryoLensClient(server.url) as client:
        expected = client.reconstruct(expected_box(tomo.data, centre))["reconstruction"]
    np.testing.assert_allclose(layer.data, expected, rtol=1e-4, atol=1e-5)


def test_screenshot_of_picks_and_reconstructions_in_place(make_napari_viewer, qtbot, server,
                                                         tmp_path):
    """A tomogram slice with its picks and their reconstructions over them (docs/napari.png)."""
    centres = [[32, 34 + 20 * i, 34 + 20 * i] for i in range(6)]  # the pasted particles
    viewer, widget, tomo, points = viewer_with_picks(make_napari_viewer, centres)
    points.size = 3
    viewer.window._qt_window.resize(1400, 820)
    tomo.contrast_limits = (-3.0, 5.0)  # particles dark on a mid-grey background
    widget.url.setText(server.url)
    widget.colour.setChecked(True)
    run_and_wait(qtbot, widget, widget.reconstruct_all)
    assert widget.progress.value() == 6
    viewer.layers.move(viewer.layers.index(points), len(viewer.layers))  # picks on top
    viewer.layers.selection.active = points
    viewer.dims.set_point(0, 32 * SCALE[0] + TRANSLATE[0])
    viewer.reset_view()
    picture = viewer.screenshot(str(tmp_path / "napari.png"), canvas_only=False)
    assert picture.ndim == 3 and picture.shape[2] == 4
    assert picture[..., :3].std() > 10  # not a blank window
    if os.environ.get("CRYOLENS_WRITE_SCREENSHOT"):
        shutil.copyfile(tmp_path / "napari.png", REPO / "docs" / "napari.png")


def test_check_names_the_servers_model(make_napari_viewer, qtbot, server):
    _, widget, _, _ = viewer_with_picks(make_napari_viewer)
    widget.url.setText(server.url)
    widget.check_button.click()
    qtbot.waitUntil(lambda: bool(widget.messages), timeout=WAIT_MS)
    assert widget.messages[-1] == f"CryoLens: server {server.url}: demo"
