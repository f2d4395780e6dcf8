"""Particle files and a small copick project on disk, made the way users' tools make them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BOX = 48
#: The copick test tomogram (z, y, x) at 10 A, and a coarser copy at 20 A.
TOMO_SHAPE = (64, 96, 96)
#: Picks of run TS_1 (x, y, z angstrom), with the transform's shift added to the first: its
#: full position is (485, 476, 314) A -> voxel x 48.5 -> 49 (rounding; truncation gives 48),
#: y 47.6 -> 48, z 31.4 -> 31.
TS1_LOCATIONS = np.array([[475.0, 476.0, 300.0],   # + shift (10, 0, 14): inside
                          [5.0, 5.0, 5.0],         # a corner: box mostly outside
                          [940.0, 480.0, 320.0]])  # x near the far edge
TS1_SHIFT = np.array([10.0, 0.0, 14.0])
TS2_LOCATIONS = np.array([[480.0, 480.0, 320.0]])


def particle_stack(n: int = 5, seed: int = 0, box: int = BOX) -> np.ndarray:
    """Noisy blobs, not white noise: reconstructions then have something to show."""
    rng = np.random.default_rng(seed)
    grid = np.indices((box,) * 3).astype(np.float32) - (box - 1) / 2
    out = np.empty((n, box, box, box), np.float32)
    for i in range(n):
        centre = rng.uniform(-4, 4, 3).astype(np.float32)
        r2 = sum((grid[a] - centre[a]) ** 2 for a in range(3))
        out[i] = -np.exp(-r2 / (2 * (6 + i) ** 2)) + 0.3 * rng.standard_normal((box,) * 3)
    return out


def write_mrc(path: Path, data: np.ndarray, voxel_size: float = 10.0, origin=(0.0, 0.0, 0.0),
              image_stack: bool = False) -> Path:
    import mrcfile

    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data, np.float32))
        if image_stack:
            mrc.set_image_stack()
        mrc.voxel_size = voxel_size
        mrc.header.origin = origin
    return path


def make_copick_project(root: Path, seed: int = 1) -> tuple[Path, dict[str, np.ndarray]]:
    """A filesystem copick project with runs TS_1 (10 A and 20 A tomograms, 3 ribosome picks
    inside and at the edges, 1 other pick) and TS_2 (1 ribosome pick), built with copick's own
    API. Returns the config path and the 10 A tomograms."""
    import copick

    config = root / "copick_config.json"
    config.write_text(json.dumps({
        "config_type": "filesystem", "name": "test project", "user_id": "tester",
        "overlay_root": f"local://{root / 'overlay'}", "overlay_fs_args": {"auto_mkdir": True},
        "pickable_objects": [
            {"name": "ribosome", "is_particle": True, "label": 1, "color": [255, 0, 0, 255],
             "radius": 120.0},
            {"name": "apoferritin", "is_particle": True, "label": 2, "color": [0, 255, 0, 255],
             "radius": 60.0},
        ]}))
    project = copick.from_file(str(config))
    rng = np.random.default_rng(seed)
    tomograms = {}
    for name, locations in (("TS_1", TS1_LOCATIONS), ("TS_2", TS2_LOCATIONS)):
        run = project.new_run(name)
        data = (rng.standard_normal(TOMO_SHAPE) + 2.0).astype(np.float32)
        tomograms[name] = data
        run.new_voxel_spacing(10.0).new_tomogram("wbp").from_numpy(data, levels=1)
        if name == "TS_1":
            coarse = data[::2, ::2, ::2].copy()
            run.new_voxel_spacing(20.0).new_tomogram("wbp").from_numpy(coarse, levels=1)
        transforms = np.tile(np.eye(4), (len(locations), 1, 1))
        if name == "TS_1":
            transforms[0, :3, 3] = TS1_SHIFT
        picks = run.new_picks("ribosome", session_id="0", user_id="tester")
        picks.from_numpy(locations, transforms)
        other = run.new_picks("apoferritin", session_id="0", user_id="tester")
        other.from_numpy(np.array([[300.0, 300.0, 300.0]]))
    return config, tomograms
