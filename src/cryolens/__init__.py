"""CryoLens: fast, batch-native inference for the CryoLens cryo-ET particle VAE.

The public entry point is :class:`cryolens.engine.Engine` (numpy in, numpy out).
"""
from __future__ import annotations

__version__ = "0.1.0"
