"""The napari widget's own behaviour, with stand-in backends or none reachable: queued picks,
the viewer kept responsive, closing mid-run, messages for what cannot be done, layers kept
chosen and watched once."""
from __future__ import annotations

import numpy as np
import pytest
from napari_helpers import (
    SHAPE,
    WAIT_MS,
    HeldBackend,
    InstantBackend,
    run_and_wait,
    tomogram,
    viewer_with_picks,
)
from server_helpers import free_port

pytestmark = pytest.mark.slow


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
