"""The napari widget's tests: skipped, with the reason, where napari, pytest-qt or the plugin is
missing; an Xvfb display for the whole run, a settings file per test, the demo server."""
from __future__ import annotations

import os
import select
import shutil
import subprocess

import pytest

pytest.importorskip("napari", reason="napari is not installed (pip install "
                    "'napari[pyqt6]' pytest-qt ./napari-cryolens)")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed")
pytest.importorskip("napari_cryolens", reason="napari-cryolens is not installed "
                    "(pip install ./napari-cryolens)")


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
    # Xvfb picks a free display itself and writes its number to -displayfd: pytest-xdist's
    # workers may each start one
    read, write = os.pipe()
    process = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", "1600x1000x24",
                                "-nolisten", "tcp"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, pass_fds=(write,),
                               preexec_fn=_die_with_parent)  # noqa: PLW1509 - before any thread
    os.close(write)
    with os.fdopen(read) as said:
        ready, _, _ = select.select([said], [], [], 10)
        number = said.readline().strip() if ready else ""
    if not number.isdigit():
        process.kill()
        pytest.skip("Xvfb did not start")
    os.environ["DISPLAY"] = f":{number}"
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    return process


@pytest.fixture(autouse=True)
def settings_file(tmp_path, monkeypatch):
    path = tmp_path / "napari-cryolens.json"
    monkeypatch.setenv("NAPARI_CRYOLENS_SETTINGS", str(path))
    return path


@pytest.fixture(scope="session")
def server(demo_server):
    """The demo model's server (tests/conftest.py's shared process)."""
    return demo_server
