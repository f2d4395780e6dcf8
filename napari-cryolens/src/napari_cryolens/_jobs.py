"""One run of the widget, off the GUI thread: the picks and options captured for it (Job), each
chunk of answers (Chunk), and the generator a napari worker runs to fetch them.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
from napari.layers import Image

from napari_cryolens import core
from napari_cryolens._layers import pick_layers


@dataclass
class Job:
    """One run: picks to reconstruct and everything needed, captured on the GUI thread."""

    indices: list[int]
    data: object  # the tomogram array (numpy, dask or zarr)
    #: the tomogram's mean, for boxes past its edge: None until the worker has computed it (for
    #: a lazy array it reads a sample of the whole tomogram, too slow for the GUI thread)
    fill: float | None
    fill_key: int  # the tomogram array's id, under which the widget keeps the fill value
    centres: np.ndarray  # (N, 3) voxels
    scale: np.ndarray
    translate: np.ndarray
    points_name: str
    options: core.Options
    batch_size: int
    combined: bool = False  # paste every pick into one tomogram-sized layer
    shape: tuple = ()  # the tomogram's, for the combined layer
    started: float = field(default_factory=time.perf_counter)
    #: Chunks the worker may fetch ahead of what the viewer has shown: released as each chunk
    #: is shown, so a slow viewer (hundreds of layers, a busy machine) holds the worker back
    #: and Cancel stops within a request or two, not after every answer has arrived.
    ahead: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(AHEAD))
    cancelled: threading.Event = field(default_factory=threading.Event)


#: How many chunks the worker fetches before the viewer has shown the first of them.
AHEAD = 2


@dataclass
class Chunk:
    """One request's answers: its picks, their box centres and the arrays returned."""

    indices: list[int]
    centres: np.ndarray
    arrays: dict[str, np.ndarray]
    #: each pick's Image layers, made in the worker thread (napari layers are plain models
    #: until added)
    layers: list[list[Image]] = field(default_factory=list)
    #: picks whose layers the viewer has added
    shown: int = 0


def run_job(backend, job: Job):
    """Worker thread: cut each chunk's boxes, reconstruct them, make their layers and yield a
    :class:`Chunk`; or a message: picks skipped (their box holds NaN or infinity, which the
    client refuses for the whole request), or the backend's failure, after which it stops.
    At most :data:`AHEAD` chunks ahead of the viewer; none once the run is cancelled. While it
    waits for the viewer it yields None now and then: napari asks the workers of a closing
    window (and every worker when the application quits, waiting for them) to quit, and a
    generator worker sees that only between yields."""
    if job.fill is None:
        job.fill = core.fill_value(job.data)
    for start in range(0, len(job.indices), job.batch_size):
        while not job.ahead.acquire(timeout=0.1):
            if job.cancelled.is_set():
                return
            yield None
        if job.cancelled.is_set():
            return
        part = slice(start, start + job.batch_size)
        indices, centres = job.indices[part], job.centres[part]
        # checked here once: the client and the engine take them as they are
        boxes, finite = core.checked_boxes(core.cut_boxes(job.data, centres, job.fill))
        if not finite.all():
            bad = [i for i, ok in zip(indices, finite, strict=True) if not ok]
            yield (f"CryoLens: {len(bad)} pick(s) of {job.points_name!r} have NaN or infinity "
                   f"in their box and were skipped: {core.listed(bad)}")
            indices = [i for i, ok in zip(indices, finite, strict=True) if ok]
            centres = centres[finite]
            if not indices:
                job.ahead.release()  # no chunk for the viewer to show
                continue
        try:
            arrays = backend.reconstruct(boxes, job.options)
        except Exception as exc:  # noqa: BLE001 - shown to the user, not raised
            where = getattr(backend, "url", "local engine")
            yield core.describe_error(exc, where)
            return
        chunk = Chunk(indices, centres, arrays)
        if not job.combined:
            chunk.layers = list(pick_layers(job, chunk))
        yield chunk
