"""A small random CryoLens model whose splats spread over the box as a trained model's do."""
from __future__ import annotations

import torch


def spread_model():
    """A small random CryoLens model (50 splats, 8 latent dims) whose latents are O(1), so its
    splats spread over the box as a trained model's do (engine tests)."""
    from cryolens.model import CryoLensConfig, CryoLensVAE

    torch.manual_seed(0)
    model = CryoLensVAE(CryoLensConfig(latent_dims=8, affinity_dims=6, n_affinity=40, n_free=10))
    with torch.no_grad():
        model.mu.weight.mul_(40)
        model.pose.weight.mul_(40)
    return model
