"""Pictures of particles and embeddings with matplotlib (Agg, no display needed).

Used by ``cryolens show``, ``cryolens map`` and ``cryolens evaluate``. Figures are built on
:class:`matplotlib.figure.Figure` directly, never through ``pyplot``, so nothing global changes
and no window system is touched.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Blank voxels between the three slices of one panel.
SLICE_GAP = 2


def figure_format(path: str | Path) -> str:
    """The file format that ``path``'s suffix names (``png``, ``pdf``, ``svg``, ``jpg``, ...,
    whatever matplotlib writes); ``png`` without a suffix. Anything else is an
    :class:`~cryolens.errors.InputError` that lists the suffixes, raised before any work."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cryolens.errors import InputError

    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    known = FigureCanvasAgg.get_supported_filetypes()
    if suffix not in known:
        raise InputError(f"{path}: cannot write a .{suffix} picture; end -o in one of "
                         f"{', '.join('.' + k for k in sorted(known))}", field="output")
    return suffix


def central_slices(volume: np.ndarray) -> np.ndarray:
    """The central z, y and x slices of a (z, y, x) volume side by side (NaN between them):
    the z slice shows (y, x), the y slice (z, x), the x slice (z, y)."""
    d, h, w = volume.shape
    planes = [volume[d // 2], volume[:, h // 2, :], volume[:, :, w // 2]]
    rows = max(p.shape[0] for p in planes)
    tiles = []
    for k, plane in enumerate(planes):
        tile = np.full((rows, plane.shape[1]), np.nan, np.float32)
        tile[: plane.shape[0]] = plane
        tiles.append(tile)
        if k < 2:
            tiles.append(np.full((rows, SLICE_GAP), np.nan, np.float32))
    return np.concatenate(tiles, axis=1)


def display_range(volume: np.ndarray) -> tuple[float, float]:
    """1st and 99th percentile: a few hot voxels do not wash the picture out."""
    lo, hi = np.nanpercentile(np.asarray(volume, np.float64), [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def slices_figure(path: str | Path, rows: Sequence[Sequence[np.ndarray | None]],
                  columns: Sequence[str], row_labels: Sequence[str] | None = None,
                  title: str | None = None, dpi: int = 100) -> Path:
    """A grid of panels, one row per particle and one column per volume (input,
    reconstruction, ...); each panel shows its volume's central z | y | x slices in grey,
    scaled to that volume's 1-99 % range. ``None`` leaves a panel empty. Written in the format
    the suffix names (:func:`figure_format`)."""
    from matplotlib.figure import Figure

    n_rows, n_cols = len(rows), len(columns)
    fig = Figure(figsize=(2.9 * n_cols, 1.05 * n_rows + 0.5), dpi=dpi, layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for r, volumes in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            volume = volumes[c] if c < len(volumes) else None
            if volume is not None:
                lo, hi = display_range(volume)
                ax.imshow(central_slices(np.asarray(volume, np.float32)), cmap="gray",
                          vmin=lo, vmax=hi, interpolation="nearest")
            if r == 0:
                ax.set_title(f"{columns[c]}\nz | y | x", fontsize=8)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center")
    return _save(fig, path, title)


def pca_2d(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components (N, 2) and the fraction of variance each explains."""
    x = np.asarray(embeddings, np.float64)
    x = x - x.mean(0)
    if len(x) < 2:
        return np.zeros((len(x), 2)), np.zeros(2)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    coords = x @ comps.T
    if coords.shape[1] < 2:  # a 1-D embedding
        coords = np.column_stack([coords, np.zeros(len(x))])
    total = (s**2).sum()
    explained = (s[:2] ** 2) / total if total > 0 else np.zeros(2)
    return coords, np.pad(explained, (0, 2 - len(explained)))


#: Most categories a map colours one by one; the rest share one grey "other" entry.
MAX_CATEGORIES = 10
#: Longest category name in a legend; longer ones keep their start and end.
LEGEND_CHARS = 28


def scatter_figure(path: str | Path,
                   panels: Sequence[tuple[str, np.ndarray, tuple[str, str]]],
                   values: Sequence | None, color_label: str, title: str | None = None,
                   dpi: int = 120) -> Path:
    """One scatter panel per (title, (N, 2) coordinates, (x label, y label)), coloured by
    ``values``: a colour bar for numbers of many values; otherwise a legend of at most
    :data:`MAX_CATEGORIES` entries (the most frequent categories, then "other" in grey),
    names shortened to fit. Written in the format the suffix names."""
    from matplotlib.figure import Figure

    values = None if values is None else np.asarray(values, dtype=object)
    numeric = values is not None and _is_numeric(values)
    groups = legend_groups(values) if values is not None and not numeric else []
    legend_width = 0.0 if not groups else 0.6 + 0.065 * max(len(g[0]) for g in groups)
    fig = Figure(figsize=(4.6 * len(panels) + (1.2 if numeric else legend_width), 4.4),
                 dpi=dpi, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    size = 14 if len(panels[0][1]) < 200 else 6
    for ax, (name, coords, (xlabel, ylabel)) in zip(axes, panels, strict=True):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if values is None:
            ax.scatter(coords[:, 0], coords[:, 1], s=size, alpha=0.8, color="C0")
        elif numeric:
            points = ax.scatter(coords[:, 0], coords[:, 1], s=size, alpha=0.8,
                                c=values.astype(np.float64), cmap="viridis")
        else:
            for label, mask, colour in groups:
                ax.scatter(coords[mask, 0], coords[mask, 1], s=size, alpha=0.8, label=label,
                           color=colour)
    if numeric:
        fig.colorbar(points, ax=list(axes), label=color_label)
    elif groups:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, title=color_label, loc="outside right upper", fontsize=7,
                   title_fontsize=8, markerscale=1.5, frameon=False)
    return _save(fig, path, title)


def legend_groups(values: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
    """(legend name, mask, colour) per category: all of them when there are at most
    :data:`MAX_CATEGORIES`, else the most frequent ones and a grey "other (k values)"."""
    labels = np.array(["(none)" if v is None else str(v) for v in values])
    names, counts = np.unique(labels, return_counts=True)
    if len(names) <= MAX_CATEGORIES:
        kept = list(names)
    else:
        kept = sorted(names[np.argsort(-counts, kind="stable")[: MAX_CATEGORIES - 1]])
    groups = [(_short(name), labels == name, f"C{k}") for k, name in enumerate(kept)]
    rest = ~np.isin(labels, kept)
    if rest.any():
        groups.append((f"other ({len(names) - len(kept)} values)", rest, "0.75"))
    return groups


def _short(name: str) -> str:
    if len(name) <= LEGEND_CHARS:
        return name
    half = (LEGEND_CHARS - 1) // 2
    return name[:half] + "…" + name[-half:]


def _is_numeric(values: np.ndarray) -> bool:
    """Numbers with more than 12 distinct values get a colour bar; fewer are categories."""
    present = [v for v in values if v is not None]
    if not present or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                              for v in present):
        return False
    return len(set(present)) > 12


def _save(fig, path, title: str | None) -> Path:
    """``fig`` with its ``title`` written to ``path`` (its folder made as embed and reconstruct
    make theirs), in the format its suffix names."""
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=figure_format(path))
    return path


__all__ = ["central_slices", "display_range", "figure_format", "legend_groups", "pca_2d",
           "scatter_figure", "slices_figure"]
