"""The Image layers of reconstructions: each pick's own over its particle, or every pick
pasted into one tomogram-sized layer; and the check that a layer is placed by scale and
translate alone."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image

from napari_cryolens import core

if TYPE_CHECKING:
    from napari_cryolens._jobs import Chunk, Job

COLORMAPS = {None: "magma", "affinity": "green", "free": "magenta"}


def rotated(layer) -> bool:
    """Whether a layer's data reaches the world through more than a scale and a translation."""
    eye = np.eye(layer.ndim)
    return (not np.allclose(layer.rotate, eye) or bool(np.any(layer.shear))
            or not np.allclose(layer.affine.affine_matrix, np.eye(layer.ndim + 1)))


def pick_layers(job: Job, chunk: Chunk):
    """Each pick's Image layers, over its particle: its reconstruction (and its segments)."""
    for row, (index, centre) in enumerate(zip(chunk.indices, chunk.centres, strict=True)):
        translate = core.box_translate(centre, job.scale, job.translate)
        meta = {"cryolens": {"pick": index, "picks": job.points_name,
                             "centre_voxel": [int(c) for c in centre],
                             "options": vars(job.options)}}
        layers = []
        for segment in (None, *core.SEGMENTS):
            key = "reconstruction" if segment is None else f"{segment}_reconstruction"
            if key in chunk.arrays and (segment is None or job.options.segments):
                volume = chunk.arrays[key][row]
                layers.append(Image(volume, name=core.layer_name(index, segment),
                                    scale=job.scale, translate=translate,
                                    colormap=COLORMAPS[segment],
                                    contrast_limits=core.contrast_limits(volume),
                                    blending="additive", opacity=0.8, metadata=meta))
        yield layers


def place(viewer, layer: Image) -> None:
    """Add a reconstruction's layer, or update the one of the same name (a pick redone)."""
    if layer.name not in viewer.layers:
        viewer.layers.append(layer)
        return
    old = viewer.layers[layer.name]
    old.data = layer.data
    old.scale = layer.scale
    old.translate = layer.translate
    old.contrast_limits = layer.contrast_limits
    old.metadata.update(layer.metadata)


def paste(viewer, job: Job, chunk: Chunk) -> None:
    """Combined mode: each reconstruction into one tomogram-sized layer (the larger value
    where boxes overlap), cropped at the tomogram's edge."""
    name = f"cryolens all picks ({job.points_name})"
    volumes = chunk.arrays["reconstruction"]
    layer = next((lay for lay in viewer.layers if lay.name == name), None)
    if layer is None or layer.data.shape != job.shape:
        low = float(volumes.min())
        canvas = np.full(job.shape, low, np.float32)
    else:
        canvas = layer.data
    for volume, centre in zip(volumes, chunk.centres, strict=True):
        src, dst = [], []
        for a in range(3):
            start = int(centre[a]) - core.HALF
            lo, hi = max(start, 0), min(start + core.BOX, job.shape[a])
            dst.append(slice(lo, hi))
            src.append(slice(lo - start, hi - start))
        if all(s.stop > s.start for s in dst):
            np.maximum(canvas[tuple(dst)], volume[tuple(src)], out=canvas[tuple(dst)])
    if layer is None or layer.data is not canvas:
        if layer is not None:
            viewer.layers.remove(layer)
        viewer.add_image(canvas, name=name, scale=job.scale, translate=job.translate,
                         colormap=COLORMAPS[None], blending="additive", opacity=0.8,
                         contrast_limits=core.contrast_limits(volumes),
                         metadata={"cryolens": {"picks": job.points_name}})
    else:
        layer.refresh()
