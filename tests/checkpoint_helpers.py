"""A small random CryoLens state dict and a file's SHA-256, for the checkpoint tests."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from cryolens.model.config import CryoLensConfig
from cryolens.model.vae import CryoLensVAE

SMALL = CryoLensConfig(latent_dims=16, affinity_dims=12, n_affinity=64, n_free=16)


def small_state_dict(config: CryoLensConfig = SMALL, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in CryoLensVAE(config).state_dict().items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
