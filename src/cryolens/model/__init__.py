"""The CryoLens network in pure PyTorch: encoder, pose, segmented splat decoder, renderer.

Parameter names match the published CryoLens checkpoints so their state dicts load unchanged.
"""
from __future__ import annotations

from cryolens.model.config import CryoLensConfig
from cryolens.model.vae import CryoLensVAE

__all__ = ["CryoLensConfig", "CryoLensVAE"]
