"""The napari widget against a local demo server: how long a pick takes to show its
reconstruction, and how much of the server's binary batch rate a whole Points layer gets.

Run: python bench/napari.py [--picks 30] [--batch 200] [--batch-size 32] [--checkpoint demo]
(needs napari, pytest-free; starts Xvfb itself when DISPLAY is unset).

Prints:
  live picking: seconds from adding a pick (as a click in add mode does) to its Image layer in
  the viewer, p50 and p95 over ``--picks`` picks, one at a time;
  batch: a Points layer of ``--batch`` picks through "Reconstruct all" (cutting the boxes, the
  requests, adding the layers), picks/s, with a layer per pick and with "all picks in one
  layer", against the same boxes sent by CryoLensClient as one binary stack (``--batch-size`` a
  request, the better of two runs), and the ratio.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from server_helpers import start_cli_server, stop_on_sigterm  # noqa: E402 - tests/ on sys.path

SCALE = (10.0, 10.0, 10.0)
SHAPE = (96, 256, 256)


def start_xvfb() -> subprocess.Popen | None:
    if os.environ.get("DISPLAY"):
        return None
    if shutil.which("Xvfb") is None:
        sys.exit("no DISPLAY and no Xvfb (apt-get install xvfb)")
    number = 80 + os.getpid() % 100
    process = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1600x1000x24",
                                "-nolisten", "tcp"], stderr=subprocess.DEVNULL)
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        time.sleep(0.05)
    os.environ["DISPLAY"] = f":{number}"
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    return process


def wait(app, condition, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the widget did not finish")
        app.processEvents()
        time.sleep(0.0005)


def setup(napari, url: str, picks: np.ndarray, data: np.ndarray):
    from napari_cryolens._widget import CryoLensWidget

    viewer = napari.Viewer(show=True)
    viewer.add_image(data, name="tomogram", scale=SCALE)
    points = viewer.add_points(picks, name="picks", scale=SCALE)
    widget = CryoLensWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.url.setText(url)
    widget.mode.setCurrentIndex(0)
    return viewer, widget, points


def main() -> None:
    stop_on_sigterm()  # servers started below are stopped on SIGTERM too
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--picks", type=int, default=30)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint", default="demo")
    args = parser.parse_args()
    xvfb = start_xvfb()
    os.environ.setdefault("NAPARI_CRYOLENS_SETTINGS", "/tmp/napari-cryolens-bench.json")
    import napari
    from napari_cryolens import core
    from qtpy.QtWidgets import QApplication

    from cryolens.client import CryoLensClient

    server = start_cli_server(args.checkpoint)
    rng = np.random.default_rng(0)
    data = rng.normal(size=SHAPE).astype(np.float32)
    try:
        app = QApplication.instance() or QApplication([])
        # live picking, one pick at a time
        viewer, widget, points = setup(napari, server.url, np.zeros((0, 3)), data)
        widget.live.setChecked(True)
        seconds = []
        for i in range(args.picks + 1):
            pick = rng.uniform(0, 1, 3) * (np.array(SHAPE) - 1)
            name = core.layer_name(i)
            start = time.perf_counter()
            points.add(pick)
            wait(app, lambda name=name: name in viewer.layers and not widget.busy)
            if i:  # the first one opens the connection
                seconds.append(time.perf_counter() - start)
        cuts = statistics.quantiles(seconds, n=20)
        print(f"live picking, pick to layer: p50 {statistics.median(seconds):.3f} s, "
              f"p95 {cuts[18]:.3f} s over {len(seconds)} picks")
        viewer.close()

        # a whole Points layer, in batches
        picks = rng.uniform(0, 1, (args.batch, 3)) * (np.array(SHAPE) - 1)
        centres = core.centre_voxels(picks)
        boxes = core.cut_boxes(data, centres, core.fill_value(data))
        client_rate = 0.0
        with CryoLensClient(server.url, batch_size=args.batch_size) as client:
            client.reconstruct(boxes[:8])  # warm
            for _ in range(2):  # the better of two: the machine is shared
                start = time.perf_counter()
                client.reconstruct(boxes, use_segmented_decoder=False,  # the widget's options
                                   use_final_convolution=True, use_predicted_pose=False)
                client_rate = max(client_rate, args.batch / (time.perf_counter() - start))
        for combined in (False, True):
            viewer, widget, points = setup(napari, server.url, picks, data)
            widget.batch_size.setValue(args.batch_size)
            widget.live.setChecked(False)
            widget.combined.setChecked(combined)
            start = time.perf_counter()
            widget.reconstruct_all()
            wait(app, lambda widget=widget: not widget.busy)
            widget_rate = args.batch / (time.perf_counter() - start)
            assert widget.progress.value() == args.batch
            how = "one layer for all" if combined else "a layer per pick"
            print(f"batch of {args.batch} picks ({args.batch_size} a request, {how}): widget "
                  f"{widget_rate:.1f} picks/s, CryoLensClient binary stack {client_rate:.1f} "
                  f"volumes/s: {widget_rate / client_rate:.0%} of the server's batch rate")
            viewer.close()
    finally:
        server.stop()
        if xvfb is not None:
            xvfb.terminate()


if __name__ == "__main__":
    main()
