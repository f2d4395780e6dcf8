"""napari-cryolens: CryoLens reconstructions of picked particles, shown in place in napari."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["CryoLensWidget"]


def __getattr__(name: str):
    if name == "CryoLensWidget":  # imported on use: the manifest alone must not need Qt
        from napari_cryolens._widget import CryoLensWidget

        return CryoLensWidget
    raise AttributeError(name)
