"""A synthetic dataset for the explorer: a copick project whose tomograms hold simulated
particles of a few families (cryolens.synth), picked per family and embedded with the `demo`
checkpoint by `cryolens embed`, so the map shows one cluster per family."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

#: Structures of cryolens.synth, and the copick objects they are picked as ("_" is not allowed).
STRUCTURES = ("ribosome_80s", "apoferritin", "chaperonin_tric", "enolase")
FAMILIES = tuple(name.replace("_", "-") for name in STRUCTURES)
RUNS = ("TS_1", "TS_2")
BOX = 48
VOXEL = 10.0
#: Particles of each family in each run.
PER_RUN = 12
#: Each run's tomogram is one slab of GRID x GRID boxes, a particle centred in each.
GRID = 7


def make_project(root: Path, per_run: int = PER_RUN, seed: int = 0) -> Path:
    """The copick project (config path): runs TS_1 and TS_2, a 'wbp' tomogram at 10 A each,
    picks of every family by user 'sim' in session '0'."""
    import copick

    from cryolens.synth import ParticleSimulator, load_structures

    if per_run * len(FAMILIES) > GRID * GRID:
        raise ValueError(f"at most {GRID * GRID // len(FAMILIES)} particles per family and run")
    root.mkdir(parents=True, exist_ok=True)
    config = root / "copick_config.json"
    config.write_text(json.dumps({
        "config_type": "filesystem", "name": "explorer test project", "user_id": "sim",
        "overlay_root": f"local://{root / 'overlay'}", "overlay_fs_args": {"auto_mkdir": True},
        "pickable_objects": [
            {"name": name, "is_particle": True, "label": i + 1,
             "color": [60 * i % 255, 120, 200, 255], "radius": 80.0}
            for i, name in enumerate(FAMILIES)]}))
    structures = {s.name: s for s in load_structures()}
    simulator = ParticleSimulator([structures[n] for n in STRUCTURES], snr=3.0, seed=seed)
    project = copick.from_file(str(config))
    for run_name in RUNS:
        labels = np.repeat(np.arange(len(FAMILIES)), per_run)
        batch = simulator.sample(len(labels), labels=labels)
        tomogram = simulator.rng.standard_normal((BOX, GRID * BOX, GRID * BOX)).astype(np.float32)
        centres: dict[str, list] = {name: [] for name in FAMILIES}
        for slot, (label, particle) in enumerate(zip(labels, batch.particles, strict=True)):
            row, col = divmod(slot, GRID)
            tomogram[:, row * BOX:(row + 1) * BOX, col * BOX:(col + 1) * BOX] = particle
            centre = [(col * BOX + BOX // 2) * VOXEL, (row * BOX + BOX // 2) * VOXEL,
                      (BOX // 2) * VOXEL]
            centres[FAMILIES[label]].append(centre)
        run = project.new_run(run_name)
        run.new_voxel_spacing(VOXEL).new_tomogram("wbp").from_numpy(tomogram, levels=1)
        for name, points in centres.items():
            run.new_picks(name, session_id="0", user_id="sim").from_numpy(np.array(points))
    return config


def embed_project(config: Path, out: Path) -> Path:
    """One table of every family's picks, as `cryolens embed --object NAME` writes them (one
    run per family, their rows concatenated; the first file's metadata kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cryolens.cli import main

    tables = []
    for name in FAMILIES:
        part = out.with_name(f"{out.stem}-{name}.parquet")
        code = main(["embed", str(config), "--object", name, "-o", str(part), "-c", "demo",
                     "--device", "cpu", "--quiet", "--batch-size", "16"])
        if code != 0:
            raise RuntimeError(f"cryolens embed failed for {name}")
        tables.append(pq.read_table(part))
        part.unlink()
    table = pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)
    pq.write_table(table, out)
    return out


def dataset(root: Path, per_run: int = PER_RUN) -> tuple[Path, Path]:
    """(copick config, embeddings.parquet) under ``root``."""
    config = make_project(root / "project", per_run)
    return config, embed_project(config, root / "embeddings.parquet")


def cached_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """:func:`dataset`, made once per test run and shared by the modules that use it; with
    pytest-xdist by every worker too, in the run's folder above theirs (the first worker to
    take the lock makes it, the others wait for it)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "explore-dataset"
    done = root / "embeddings.parquet"
    with FileLock(str(base / "explore-dataset.lock")):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            dataset(root)
    return root / "project" / "copick_config.json", done


def explorer_client(table, reconstruct=None):
    """Starlette's TestClient of the explorer's app on ``table`` (httpx over ASGI, no socket);
    ``reconstruct``: the reconstructor, or None for a table explored without a model."""
    from fastapi.testclient import TestClient

    from cryolens.explore.app import Explorer, create_app

    return TestClient(create_app(Explorer.open(table, reconstruct, None)))


#: Debian's chromium (Playwright's own browser download is not reachable here).
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser")
                 if shutil.which(name)), None)
#: WebGL on the CPU (SwiftShader): headless machines have no GPU for Chromium.
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-dev-shm-usage"]


def open_page(browser, url: str, timeout_ms: float = 120_000):
    """A page of ``url`` once the map is drawn: (page, console errors and page errors, requests
    that left 127.0.0.1 (refused))."""
    page = browser.new_page(viewport={"width": 1400, "height": 850})
    problems: list[str] = []
    outside: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    def only_local(route):
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(url)
    page.wait_for_function("document.body.dataset.pointsDrawn !== undefined || "
                           "document.body.dataset.state === 'failed'", timeout=timeout_ms)
    return page, problems, outside
