"""cryolens explore at scale: how long a big table takes to open to a drawn map in headless
Chromium, a neighbours query, a UMAP layout (first time and cached), and the particle panel.

Run: python bench/explore.py [--rows 1000000] [--dims 40] [--umap-rows 100000]
     [--only map,umap,panel,clusters] [--workdir DIR]
(needs Debian's chromium and the playwright package; UMAP needs umap-learn, the 'explore'
extra; the panel simulates and embeds a small copick dataset with the demo model first).

Prints, each measured once on this machine (loaded or not: say so when you quote them):
  map: seconds from starting `cryolens explore` on a --rows x --dims table (PCA) to /api/table
  answering, and from opening the page to every point drawn (the page's data-points-drawn);
  neighbours: p50 and p95 of GET /api/neighbours/{row}?k=10 over 50 random rows, and of the
  numpy query alone;
  umap: seconds for the UMAP layout of --umap-rows rows the first time, then from a fresh
  server with the layout cached beside the table, to the page drawn;
  panel: p50 and p95 over 20 rows of the panel's requests made one after another, as the page
  makes them (particle PNG, reconstruction PNG with the demo model, 8 neighbours), each row
  read for the first time;
  clusters: seconds for POST /api/cluster's k-means (k 20, the table's families) over --rows x
  --dims, and for HDBSCAN over 20,000 of them, in-process; and the share of rows whose cluster
  holds mostly their own family.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from explore_helpers import CHROMIUM, CHROMIUM_ARGS, dataset, open_page  # noqa: E402 - tests/ on sys.path
from server_helpers import ServerProcess, free_port, stop_on_sigterm  # noqa: E402 - as above

FAMILIES = 20


def synthetic_table(path: Path, rows: int, dims: int, seed: int = 0) -> Path:
    """``rows`` embeddings in ``FAMILIES`` Gaussian clusters, with the columns of `cryolens
    embed` that the page shows (object, run, source, index, coordinates)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((FAMILIES, dims), dtype=np.float32) * 4
    labels = rng.integers(0, FAMILIES, rows)
    embeddings = centres[labels] + rng.standard_normal((rows, dims), dtype=np.float32)
    names = pa.array([f"family-{i}" for i in range(FAMILIES)])
    columns = {
        "source": pa.array(["synthetic.npy"] * rows),
        "index": pa.array(np.arange(rows)),
        "format": pa.array(["npy"] * rows),
        "run": pa.DictionaryArray.from_arrays(pa.array(labels % 10), pa.array(
            [f"run-{i}" for i in range(10)])).cast(pa.string()),
        "object": pa.DictionaryArray.from_arrays(pa.array(labels), names).cast(pa.string()),
    }
    for axis in "xyz":
        columns[f"{axis}_angstrom"] = pa.array(rng.uniform(0, 5000, rows))
    for k in range(dims):
        columns[f"embedding_{k}"] = pa.array(embeddings[:, k])
    pq.write_table(pa.table(columns), path)
    return path


def serve(table: Path, *extra: str) -> tuple[ServerProcess, float]:
    port = free_port()
    started = time.perf_counter()
    server = ServerProcess([sys.executable, "-m", "cryolens.cli", "explore", str(table),
                            "--port", str(port), *extra], port)
    server.wait_healthy(timeout=600, path="/api/table")
    return server, time.perf_counter() - started


def drawn(browser, url: str) -> float:
    started = time.perf_counter()
    page, problems, outside = open_page(browser, url, timeout_ms=600_000)
    seconds = time.perf_counter() - started
    count = page.evaluate("document.body.dataset.pointsDrawn")
    steps = page.evaluate("window.explorer.timings")
    page.close()
    print("  in the page (ms since it started loading): " +
          ", ".join(f"{step} {ms}" for step, ms in steps.items()))
    if problems or outside:
        print(f"  page problems: {problems} {outside}")
    print(f"  the page drew {count} points")
    return seconds


def quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {1000 * statistics.median(ordered):.1f} ms, p95 {1000 * p95:.1f} ms"


def bench_map(browser, work: Path, rows: int, dims: int) -> None:
    import requests

    from cryolens.explore.neighbours import Neighbours
    from cryolens.explore.table import EmbeddingTable

    table = work / f"table-{rows}x{dims}.parquet"
    if not table.exists():
        started = time.perf_counter()
        synthetic_table(table, rows, dims)
        print(f"wrote {table} ({table.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - started:.1f} s")
    server, ready = serve(table)
    try:
        page = drawn(browser, server.url + "/")
        print(f"map: {rows} x {dims}, PCA: server ready in {ready:.1f} s (reads the table), "
              f"page drawn in {page:.1f} s after it; {ready + page:.1f} s in all")
        rng = np.random.default_rng(1)
        times = []
        for row in rng.integers(0, rows, 51):
            started = time.perf_counter()
            requests.get(f"{server.url}/api/neighbours/{row}", params={"k": 10}, timeout=60)
            times.append(time.perf_counter() - started)
        print(f"neighbours over HTTP at {rows} rows: {quantiles(times[1:])}")
    finally:
        server.stop()
    loaded = EmbeddingTable.open(table)
    index = Neighbours(loaded.embeddings)
    index.query(0, 10)
    times = []
    for row in np.random.default_rng(2).integers(0, rows, 50):
        started = time.perf_counter()
        index.query(int(row), 10)
        times.append(time.perf_counter() - started)
    print(f"neighbours, the numpy query alone: {quantiles(times)}")


def bench_umap(browser, work: Path, rows: int, dims: int) -> None:
    import importlib.util

    if importlib.util.find_spec("umap") is None:
        print("umap: skipped, umap-learn is not installed (pip install "
              "'cryolens-server[explore]')")
        return
    from cryolens.explore.layout import Layouts
    from cryolens.explore.table import EmbeddingTable

    table = work / f"table-{rows}x{dims}.parquet"
    if not table.exists():
        synthetic_table(table, rows, dims)
    Path(f"{table}.umap.npz").unlink(missing_ok=True)
    loaded = EmbeddingTable.open(table)
    started = time.perf_counter()
    Layouts(table, loaded.embeddings).get("umap")
    first = time.perf_counter() - started
    server, ready = serve(table)
    try:
        page = drawn(browser, server.url + "/?layout=umap")
    finally:
        server.stop()
    print(f"umap: {rows} x {dims}: {first:.1f} s the first time (numba's compilation "
          f"included); cached: server ready in {ready:.1f} s, page drawn {page:.1f} s after it")


def bench_panel(work: Path, rows: int = 20) -> None:
    import requests

    root = work / "panel"
    table = root / "embeddings.parquet"
    if not table.exists():
        dataset(root, per_run=6)
    server, _ = serve(table, "--checkpoint", "demo", "--device", "cpu")
    try:
        requests.get(f"{server.url}/api/reconstruction/0.png", timeout=120)  # warm the model
        times = []
        for row in range(1, rows + 1):
            started = time.perf_counter()
            for path in (f"/api/particle/{row}.png", f"/api/reconstruction/{row}.png",
                         f"/api/neighbours/{row}?k=8"):
                requests.get(server.url + path, timeout=120).raise_for_status()
            times.append(time.perf_counter() - started)
        print(f"panel (particle + reconstruction with demo + neighbours), rows not seen "
              f"before: {quantiles(times)}")
    finally:
        server.stop()


def bench_clusters(rows: int, dims: int) -> None:
    from cryolens.explore.clusters import hdbscan, kmeans

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((FAMILIES, dims), dtype=np.float32) * 4
    truth = rng.integers(0, FAMILIES, rows)
    embeddings = centres[truth] + rng.standard_normal((rows, dims), dtype=np.float32)
    for name, run, n in (("k-means k 20", lambda x: kmeans(x, FAMILIES), rows),
                         ("HDBSCAN min 50", lambda x: hdbscan(x, 50), 20_000)):
        started = time.perf_counter()
        labels = run(embeddings[:n])
        took = time.perf_counter() - started
        majority = sum(np.bincount(truth[:n][labels == c]).max()
                       for c in np.unique(labels[labels >= 0]))
        print(f"clusters: {name} over {n} x {dims}: {took:.2f} s; {majority / n:.1%} of rows "
              f"in a cluster mostly of their family")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, default=40)
    parser.add_argument("--umap-rows", type=int, default=100_000)
    parser.add_argument("--only", default="map,umap,panel",
                        help="comma-separated parts: map (with neighbours), umap, panel, "
                             "clusters")
    parser.add_argument("--workdir", default=None,
                        help="keep tables here between runs (default: a temporary folder)")
    args = parser.parse_args()
    stop_on_sigterm()
    parts = set(args.only.split(","))
    if "clusters" in parts:
        bench_clusters(args.rows, args.dims)
    if not parts & {"map", "umap", "panel"}:
        return 0
    if CHROMIUM is None and parts & {"map", "umap"}:
        sys.exit("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as temporary, sync_playwright() as playwright:
        work = Path(args.workdir or temporary)
        work.mkdir(parents=True, exist_ok=True)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            if "map" in parts:
                bench_map(browser, work, args.rows, args.dims)
            if "umap" in parts:
                bench_umap(browser, work, args.umap_rows, args.dims)
            if "panel" in parts:
                bench_panel(work)
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
