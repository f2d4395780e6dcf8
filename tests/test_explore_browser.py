"""cryolens explore in a real browser: headless Chromium (Debian's package) driven by
Playwright against a real ``cryolens explore`` process on the simulated dataset. The page
draws every row, a click opens the particle panel, a lasso selection becomes copick picks.

``CRYOLENS_WRITE_SCREENSHOT=1`` also writes the panel test's picture to docs/explore.png.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from explore_helpers import CHROMIUM, CHROMIUM_ARGS, FAMILIES, cached_dataset, open_page
from server_helpers import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,  # a browser and a server process
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install "
                                                "chromium)"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config, table = cached_dataset(tmp_path_factory)
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "cryolens.cli", "explore", str(table),
                            "--checkpoint", "demo", "--device", "cpu", "--port", str(port)],
                           port)
    server.wait_healthy(path="/api/table")
    yield server, config, table
    server.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, served):
    page, problems, outside = open_page(browser, served[0].url + "/")
    yield page, problems, outside
    page.close()


def _family_rows(table: Path, family: str) -> list[int]:
    import pyarrow.parquet as pq

    names = pq.read_table(table, columns=["object"])["object"].to_pylist()
    return [i for i, name in enumerate(names) if name == family]


def _screen(page, row: int) -> tuple[float, float]:
    """Where ``row`` is drawn, in page pixels."""
    x, y = page.evaluate(f"window.explorer.plot.getScreenPosition({row})")[:2]
    box = page.locator("#canvas").bounding_box()
    return box["x"] + x, box["y"] + y


def test_the_page_draws_every_row_with_no_console_error(page, served):
    page, problems, outside = page
    rows = requests.get(served[0].url + "/api/table", timeout=5).json()["rows"]
    assert page.evaluate("document.body.dataset.state") == "ready"
    assert page.evaluate("document.body.dataset.pointsDrawn") == str(rows) == "96"
    assert "96 rows" in page.inner_text("#title")
    assert page.locator("#legend .item").count() == len(FAMILIES)
    assert problems == [] and outside == []


def test_a_click_opens_the_particle_its_reconstruction_and_its_neighbours(page, served,
                                                                        tmp_path):
    page, problems, _ = page
    row = _family_rows(served[2], "ribosome-80s")[3]
    page.mouse.click(*_screen(page, row))
    page.wait_for_function("document.getElementById('panel').dataset.neighbours !== undefined",
                           timeout=60_000)
    assert page.evaluate("document.getElementById('panel').dataset.row") == str(row)
    page.wait_for_function("[...document.querySelectorAll('#panel img')].every("
                           "i => i.complete && i.naturalWidth > 0)", timeout=60_000)
    for image in ("#particle-image", "#reconstruction-image"):
        assert page.evaluate(f"document.querySelector('{image}').naturalWidth") == 444
    want = requests.get(f"{served[0].url}/api/neighbours/{row}", params={"k": 8},
                        timeout=10).json()["rows"]
    shown = page.eval_on_selector_all("#neighbours button", "bs => bs.map(b => +b.dataset.row)")
    assert shown == want
    picture = tmp_path / "explore.png"
    page.mouse.move(*_screen(page, _family_rows(served[2], "apoferritin")[5]))
    page.wait_for_timeout(500)  # the tooltip of the point under the mouse
    page.screenshot(path=str(picture))
    if os.environ.get("CRYOLENS_WRITE_SCREENSHOT") == "1":
        shutil.copyfile(picture, REPO / "docs" / "explore.png")
    page.click(f"#neighbours button[data-row='{want[0]}']")
    page.wait_for_function(f"document.getElementById('panel').dataset.row === '{want[0]}' && "
                           "document.getElementById('panel').dataset.neighbours !== undefined",
                           timeout=60_000)
    assert problems == []


def test_a_lasso_selection_becomes_copick_picks(page, served):
    import copick

    page, problems, _ = page
    _, config, table = served
    rows = _family_rows(table, "enolase")
    points = np.array([_screen(page, r) for r in rows])
    centre = points.mean(axis=0)
    radius = np.linalg.norm(points - centre, axis=1).max() + 12
    page.click("#mode-lasso")
    ring = [centre + radius * np.array([np.cos(a), np.sin(a)])
            for a in np.linspace(0, 2 * np.pi, 40)]
    page.mouse.move(*ring[0])
    page.mouse.down()
    for x, y in ring[1:]:
        page.mouse.move(x, y, steps=2)
        page.wait_for_timeout(15)
    page.mouse.up()
    page.wait_for_function(f"document.body.dataset.selected === '{len(rows)}'", timeout=30_000)
    assert sorted(page.evaluate("window.explorer.selected")) == rows
    assert page.is_hidden("#panel-body")  # a lasso selects; only a click opens the panel
    page.select_option("#copick-object", "enolase")
    page.fill("#copick-user", "lasso-test")
    page.fill("#copick-session", "77")
    page.click("#export-copick")
    page.wait_for_function("document.getElementById('status').dataset.picks !== undefined",
                           timeout=30_000)
    assert page.inner_text("#status").startswith(f"wrote {len(rows)} picks of enolase")
    import pyarrow.parquet as pq

    values = pq.read_table(table).take(rows).to_pydict()
    root = copick.from_file(str(config))
    found = []
    for run in root.runs:
        for picks in run.get_picks(object_name="enolase", user_id="lasso-test",
                                   session_id="77"):
            found += [tuple(p) for p in picks.numpy()[0]]
    want = [(x, y, z) for x, y, z in zip(values["x_angstrom"], values["y_angstrom"],
                                          values["z_angstrom"], strict=True)]
    assert sorted(found) == sorted(want)
    assert problems == []


def test_a_box_selection_downloads_as_csv_and_parquet(page, served, tmp_path):
    import pandas as pd

    page, problems, _ = page
    rows = _family_rows(served[2], "ribosome-80s")
    points = np.array([_screen(page, r) for r in rows])
    (left, top), (right, bottom) = points.min(axis=0) - 16, points.max(axis=0) + 16
    page.click("#mode-box")
    page.mouse.move(left, top)
    page.mouse.down()
    # the box spans from where the drag is first seen (a few pixels on) to the release
    for step in np.linspace(0, 1, 40)[1:]:
        page.mouse.move(left + step * (right - left), top + step * (bottom - top))
        page.wait_for_timeout(15)
    page.mouse.up()
    page.wait_for_function(f"document.body.dataset.selected === '{len(rows)}'", timeout=30_000)
    with page.expect_download() as download:
        page.click("#export-csv")
    download.value.save_as(tmp_path / "selection.csv")
    assert sorted(pd.read_csv(tmp_path / "selection.csv")["table_row"]) == rows
    with page.expect_download() as download:
        page.click("#export-parquet")
    download.value.save_as(tmp_path / "selection.parquet")
    frame = pd.read_parquet(tmp_path / "selection.parquet")
    assert sorted(frame["table_row"]) == rows and set(frame["object"]) == {"ribosome-80s"}
    assert problems == []
