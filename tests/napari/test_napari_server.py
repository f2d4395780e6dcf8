"""The napari widget in a real viewer under Xvfb, against a real server on the demo model: the
reconstructions it shows, where it shows them, with which options (its own behaviour with
stand-in backends: test_napari_widget.py).

Needs napari, pytest-qt and the napari-cryolens plugin installed, and Xvfb (adding an Image
layer needs an OpenGL context: Mesa's software GL under Xvfb gives one; Qt's offscreen platform
does not). Skipped, with the reason, where any of these is missing (conftest.py).

``CRYOLENS_WRITE_SCREENSHOT=1`` also writes the screenshot test's picture to docs/napari.png.
"""
from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest
from napari_cryolens import core
from napari_helpers import (
    PICKS,
    REPO,
    SCALE,
    SHAPE,
    TRANSLATE,
    WAIT_MS,
    assert_same_reconstruction,
    expected_box,
    run_and_wait,
    tomogram,
    viewer_with_picks,
)

from cryolens.client import CryoLensClient

pytestmark = pytest.mark.slow


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


def _random_picks(make_napari_viewer, server, *, seed: int, count: int, batch: int):
    """A viewer with ``count`` picks spread over the tomogram, its widget on ``server``."""
    picks = np.random.default_rng(seed).uniform(0, 1, (count, 3)) * (np.array(SHAPE) - 1)
    viewer, widget, _, points = viewer_with_picks(make_napari_viewer, picks)
    widget.url.setText(server.url)
    widget.batch_size.setValue(batch)
    return viewer, widget, points


def test_batch_over_many_picks_finishes_and_colours_them(make_napari_viewer, qtbot, server):
    viewer, widget, points = _random_picks(make_napari_viewer, server, seed=3, count=60,
                                           batch=16)
    widget.colour.setChecked(True)
    run_and_wait(qtbot, widget, widget.reconstruct_all)
    assert widget.progress.value() == widget.progress.maximum() == 60
    assert sum(layer.name.startswith("cryolens pick ") for layer in viewer.layers) == 60
    assert len(widget.embeddings["picks"]) == 60
    colours = points.face_color
    assert len(np.unique(np.round(colours, 3), axis=0)) > 10  # coloured by their embeddings


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
    viewer, widget, _ = _random_picks(make_napari_viewer, server, seed=4, count=120, batch=4)
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
