"""Pictures for the particle panel: PNGs of the central z | y | x slices of a row's particle
and of its reconstruction, decoded in its predicted pose as ``cryolens show`` decodes it, by
the local engine or a CryoLens server."""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from cryolens.explore.errors import ModelFailed, NoModel

#: Reconstructions kept in memory (48^3 float32 each: 0.44 MB).
KEEP_RECONSTRUCTIONS = 128
#: Largest magnification of a picture (each voxel drawn as scale x scale pixels).
MAX_SCALE = 8

Reconstruct = Callable[[np.ndarray], np.ndarray]


def engine_reconstructor(engine) -> Reconstruct:
    """(S, S, S) -> (S, S, S) through :func:`cryolens.operations.run`, one call at a time."""
    from cryolens.operations import Operation
    from cryolens.operations import run as run_operation

    operation = Operation(kind="reconstruct", use_predicted_pose=True)
    lock = threading.Lock()

    def reconstruct(volume: np.ndarray) -> np.ndarray:
        with lock:
            return run_operation(engine, operation, volume[None]).arrays["reconstruction"][0]

    return reconstruct


def server_reconstructor(client) -> Reconstruct:
    """(S, S, S) -> (S, S, S) from a server through a :class:`cryolens.client.CryoLensClient`."""

    def reconstruct(volume: np.ndarray) -> np.ndarray:
        got = client.reconstruct(volume[None], use_predicted_pose=True)
        return np.asarray(got["reconstruction"], np.float32).reshape((-1, *volume.shape))[0]

    return reconstruct


class Reconstructions:
    """Each row's reconstruction, computed once (the last few kept)."""

    def __init__(self, reconstruct: Reconstruct | None, described: str | None) -> None:
        self.reconstruct, self.described = reconstruct, described
        self._kept: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, row: int, volume: np.ndarray) -> np.ndarray:
        if self.reconstruct is None:
            raise NoModel("this explorer has no model to reconstruct with: start it with "
                          "--checkpoint NAME or --server URL", field="row")
        with self._lock:
            if row in self._kept:
                self._kept.move_to_end(row)
                return self._kept[row]
        try:
            out = np.asarray(self.reconstruct(volume), np.float32)
        except Exception as exc:  # a server down, a model that fails: the panel says so
            raise ModelFailed(f"row {row}: {self.described} did not reconstruct it: "
                              f"{type(exc).__name__}: {exc}") from exc
        with self._lock:
            self._kept[row] = out
            while len(self._kept) > KEEP_RECONSTRUCTIONS:
                self._kept.popitem(last=False)
        return out


def slices_png(volume: np.ndarray, scale: int = 3) -> bytes:
    """PNG of the central z | y | x slices of ``volume`` in grey, scaled to its 1-99 % range
    (as ``cryolens show`` draws them), each voxel ``scale`` pixels wide; the gaps between the
    slices are transparent."""
    from matplotlib.image import imsave

    from cryolens.plots import central_slices, display_range

    image = central_slices(np.asarray(volume, np.float32))
    lo, hi = display_range(volume)
    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    out = io.BytesIO()
    imsave(out, np.ma.masked_invalid(image), cmap="gray", vmin=lo, vmax=hi, format="png")
    return out.getvalue()


__all__ = ["MAX_SCALE", "Reconstructions", "engine_reconstructor", "server_reconstructor",
           "slices_png"]
