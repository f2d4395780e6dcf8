"""What the widget does, without Qt: where picks fall in the tomogram, the boxes around them,
where a reconstruction goes, and the two ways to get one (a server, or an in-process engine).

Coordinates are napari's: a layer's data index ``i`` sits at world ``i * scale + translate``,
axes z, y, x. A pick's centre voxel is its position in the tomogram's data, rounded; its box
holds voxels ``centre - 24 .. centre + 23`` on each axis (cut by :func:`cryolens.io.cut_box`,
filled with the tomogram's mean past the edge, as for copick picks), so the reconstruction's
voxel ``j`` belongs at tomogram voxel ``centre - 24 + j``: its layer's translate is
``(centre - 24) * scale + tomogram translate``, with the tomogram's scale.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cryolens.client import CryoLensHTTPError

#: Side of a CryoLens particle box, in voxels.
BOX = 48
HALF = BOX // 2
DEFAULT_URL = "http://localhost:8023"
DEFAULT_CHECKPOINT = "demo"
#: Tomograms with more voxels than this get their fill value from a strided sample.
EXACT_MEAN_LIMIT = 256 * 1024 * 1024
SEGMENTS = ("affinity", "free")
#: Longest server message shown (a proxy's error page is a whole HTML document).
MAX_DETAIL_CHARS = 400


# -- geometry ----------------------------------------------------------------------------------
def pick_voxels(points: np.ndarray, points_scale, points_translate, image_scale,
                image_translate) -> np.ndarray:
    """(N, 3) float positions of picks (a Points layer's data) in the tomogram's voxels."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    world = points * np.asarray(points_scale, float)[-3:] + np.asarray(points_translate,
                                                                      float)[-3:]
    return (world - np.asarray(image_translate, float)[-3:]) / np.asarray(image_scale,
                                                                          float)[-3:]


def centre_voxels(voxels: np.ndarray) -> np.ndarray:
    """The voxel each pick falls in (napari's voxel centres are at whole numbers)."""
    return np.floor(np.asarray(voxels, np.float64) + 0.5).astype(np.int64).reshape(-1, 3)


def inside(centres: np.ndarray, shape) -> np.ndarray:
    """(N,) bool: whether each centre voxel (z, y, x) lies in a tomogram of ``shape``. A pick
    outside has no particle to reconstruct (its box is the fill value, or mostly so)."""
    centres = np.asarray(centres).reshape(-1, 3)
    return np.all((centres >= 0) & (centres < np.asarray(shape)[-3:]), axis=1)


def listed(indices) -> str:
    """Pick numbers for a message: ``1, 2, 5`` (the first ten, then ``...``)."""
    indices = list(indices)
    return ", ".join(map(str, indices[:10])) + (", ..." if len(indices) > 10 else "")


def fill_value(data) -> float:
    """The mean of the tomogram's finite voxels (of a strided sample's, for very large or lazy
    arrays): a masked region of NaN must not make every box past the edge NaN as well."""
    size = int(np.prod(data.shape))
    if isinstance(data, np.ndarray) and size <= EXACT_MEAN_LIMIT:
        sample = data
    else:
        step = max(1, round((size / 8_000_000) ** (1 / 3)))
        sample = np.asarray(data[::step, ::step, ::step])
    mean = float(sample.mean(dtype=np.float64))
    if not np.isfinite(mean):  # NaN or infinity somewhere (rare): only then a masked copy
        finite = sample[np.isfinite(sample)]
        mean = float(finite.mean(dtype=np.float64)) if finite.size else 0.0
    return mean


def cut_boxes(data, centres: np.ndarray, fill: float) -> np.ndarray:
    """(N, 48, 48, 48) float32 boxes around ``centres`` (z, y, x voxels), padded with ``fill``."""
    from cryolens.io import cut_box

    out = np.empty((len(centres), BOX, BOX, BOX), np.float32)
    for i, centre in enumerate(centres):
        out[i] = cut_box(data, [int(c) - HALF for c in centre], BOX, fill)
    return out


def box_translate(centre, image_scale, image_translate) -> np.ndarray:
    """World position of a reconstruction's voxel (0, 0, 0): its layer's ``translate``."""
    return ((np.asarray(centre, float) - HALF) * np.asarray(image_scale, float)[-3:]
            + np.asarray(image_translate, float)[-3:])


def contrast_limits(volume: np.ndarray) -> tuple[float, float]:
    """From the median (the empty part of the box, shown black) to the 99.9th percentile."""
    low, high = np.percentile(volume, [50.0, 99.9])
    low, high = float(low), float(high)
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        low, high = float(np.min(volume)), float(np.max(volume))
    if high <= low:
        high = low + 1.0
    return low, high


def layer_name(index: int, segment: str | None = None) -> str:
    """``cryolens pick 12`` and, for the segments, ``cryolens pick 12 affinity``/``free``."""
    return f"cryolens pick {index}" + (f" {segment}" if segment else "")


def pca_colours(embeddings: np.ndarray) -> np.ndarray:
    """(N, 4) RGBA: each embedding's place on the first two principal components as a colour
    (angle -> hue, distance from the centre -> saturation), so similar particles look alike."""
    x = np.asarray(embeddings, np.float64)
    n = len(x)
    if n < 2:
        return np.tile([1.0, 1.0, 0.0, 1.0], (n, 1))
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    pcs = x @ vt[:2].T
    if pcs.shape[1] < 2:
        pcs = np.column_stack([pcs, np.zeros(n)])
    radius = np.hypot(pcs[:, 0], pcs[:, 1])
    hue = (np.arctan2(pcs[:, 1], pcs[:, 0]) / (2 * np.pi)) % 1.0
    sat = radius / (radius.max() or 1.0)
    return np.column_stack([_hsv_to_rgb(hue, 0.25 + 0.75 * sat, np.ones(n)), np.ones(n)])


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, axis=-1) for c in
                      [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])
    return table[i, np.arange(len(h))]


# -- options and backends ----------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """What to ask for; each maps to a /reconstruct option (:func:`reconstruct_options`),
    from which the server and the local engine make the same operation."""

    use_predicted_pose: bool = False
    segments: bool = False
    final_convolution: bool = True
    embeddings: bool = False


def reconstruct_options(options: Options) -> dict[str, Any]:
    """The /reconstruct options of :data:`cryolens.contract.RECONSTRUCT` for ``options``
    (None: the server's default)."""
    return {"use_segmented_decoder": options.segments,
            "use_final_convolution": options.final_convolution,
            "use_predicted_pose": options.use_predicted_pose,
            "return_embeddings": options.embeddings or None}


def checked_boxes(boxes: np.ndarray):
    """(the finite boxes, checked once for the client and the engine, or None when none is;
    (N,) bool: which boxes are finite). A box with NaN or infinity is skipped by the widget,
    not sent."""
    from cryolens.checked import CheckedVolumes, not_finite

    boxes = np.ascontiguousarray(boxes, np.float32)
    finite = np.ones(len(boxes), bool)
    finite[not_finite(boxes)] = False
    good = boxes if finite.all() else boxes[finite]
    return (CheckedVolumes.from_checked(good, True) if len(good) else None), finite


class ServerBackend:
    """A CryoLens server, through :class:`cryolens.client.CryoLensClient` (keeps its
    connection between calls)."""

    def __init__(self, url: str = DEFAULT_URL, **client_options: Any) -> None:
        try:
            from cryolens.client import CryoLensClient
        except ImportError as exc:
            raise ImportError("napari-cryolens needs CryoLens's client: pip install "
                              "cryolens-client (its client/ folder)") from exc

        self.url = url
        self.client = CryoLensClient(url, **client_options)

    def describe(self) -> str:
        info = self.client.model_info()
        return f"server {self.url}: {info.get('checkpoint', info.get('model', 'model'))}"

    def reconstruct(self, boxes, options: Options) -> dict[str, np.ndarray]:
        """``boxes``: (N, 48, 48, 48), or :func:`checked_boxes`' (not checked again)."""
        return self.client.reconstruct(boxes, **reconstruct_options(options))

    def close(self) -> None:
        self.client.close()


class LocalBackend:
    """An in-process :class:`cryolens.engine.Engine` (needs PyTorch), loaded on first use."""

    def __init__(self, checkpoint: str = DEFAULT_CHECKPOINT) -> None:
        self.checkpoint = checkpoint
        self._engine = None
        self._lock = threading.Lock()

    @property
    def engine(self):
        with self._lock:
            if self._engine is None:
                try:
                    from cryolens.engine import Engine
                except ImportError as exc:
                    raise RuntimeError("local mode needs PyTorch and the full cryolens-server "
                                       f"package ({exc}); use a server instead") from exc
                self._engine = Engine.from_checkpoint(self.checkpoint, device="auto")
            return self._engine

    def describe(self) -> str:
        """Loads the model (a wrong checkpoint raises here), then names it and its device."""
        return f"local engine: checkpoint {self.checkpoint} on {self.engine.device}"

    def reconstruct(self, boxes, options: Options) -> dict[str, np.ndarray]:
        """As the server would: the operation of the same /reconstruct options."""
        from cryolens.contract import RECONSTRUCT
        from cryolens.operations import run

        operation = RECONSTRUCT.operation(RECONSTRUCT.defaults(reconstruct_options(options)))
        return run(self.engine, operation, boxes).named()

    def close(self) -> None:
        self._engine = None


def describe_error(exc: BaseException, where: str) -> str:
    """A one-line message for a person: the server's own message for HTTP errors, and what to
    do when the server cannot be reached."""
    try:
        from cryolens.client import CryoLensConnectionError, CryoLensHTTPError
    except ImportError:  # pragma: no cover - the client is a dependency
        CryoLensConnectionError = CryoLensHTTPError = ()  # type: ignore[assignment]
    if isinstance(exc, CryoLensConnectionError):
        return (f"CryoLens: could not reach the server at {where} ({exc.__cause__ or exc}). "
                "Start one with `cryolens serve`, fix the URL, or switch to local mode.")
    if isinstance(exc, CryoLensHTTPError):
        rid = f" (request id {exc.request_id})" if exc.request_id else ""
        return f"CryoLens server error {exc.status}: {_detail_text(exc)}{rid}"
    return f"CryoLens: {type(exc).__name__}: {exc}"


def _detail_text(exc: CryoLensHTTPError) -> str:
    """A server's error detail on one line (a proxy's HTML page folded), cut at
    :data:`MAX_DETAIL_CHARS`."""
    text = " ".join(exc.detail_text.split())
    return text if len(text) <= MAX_DETAIL_CHARS else text[:MAX_DETAIL_CHARS] + "..."


# -- settings ----------------------------------------------------------------------------------
@dataclass
class Settings:
    """What the widget remembers between sessions."""

    url: str = DEFAULT_URL
    mode: str = "server"  # or "local"
    checkpoint: str = DEFAULT_CHECKPOINT
    use_predicted_pose: bool = False
    segments: bool = False
    final_convolution: bool = True
    colour_by_embedding: bool = False
    batch_size: int = 16

    @classmethod
    def load(cls, path: Path | None = None) -> Settings:
        path = path or settings_path()
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()
        if not isinstance(stored, dict):  # valid JSON, but not the object save() writes
            return cls()
        known = {f.name: f.type for f in fields(cls)}
        defaults = cls()
        values = {k: v for k, v in stored.items() if k in known
                  and type(v) is type(getattr(defaults, k))}
        return cls(**values)

    def save(self, path: Path | None = None) -> None:
        path = path or settings_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(self), indent=1))
        except OSError:  # a read-only home must not break the widget
            pass


def settings_path() -> Path:
    """``NAPARI_CRYOLENS_SETTINGS`` if set, else ``settings.json`` in the user's config folder."""
    if os.environ.get("NAPARI_CRYOLENS_SETTINGS"):
        return Path(os.environ["NAPARI_CRYOLENS_SETTINGS"])
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "napari-cryolens" / "settings.json"
