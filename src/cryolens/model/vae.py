"""CryoLensVAE: the encoder, its four heads and the segmented splat decoder, in one module."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cryolens.model.config import CryoLensConfig
from cryolens.model.decoder import SegmentedSplatDecoder
from cryolens.model.encoder import Encoder


@dataclass
class Encoding:
    """Encoder heads for a batch: mu, log_var (B, latent); pose (B, 4) axis-angle;
    global_weight (B, 1) pre-sigmoid logit."""

    mu: torch.Tensor
    log_var: torch.Tensor
    pose: torch.Tensor
    global_weight: torch.Tensor


class CryoLensVAE(nn.Module):
    def __init__(self, config: CryoLensConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CryoLensConfig()
        self.encoder = Encoder()
        self.decoder = SegmentedSplatDecoder(config)
        flat = config.encoder_flat
        self.mu = nn.Linear(flat, config.latent_dims)
        self.log_var = nn.Linear(flat, config.latent_dims)
        self.pose = nn.Linear(flat, config.pose_dims)
        self.global_weight = nn.Linear(flat, 1)

    def encode(self, volumes: torch.Tensor) -> Encoding:
        """volumes: (B, S, S, S) normalised particles, indexed [d, h, w]."""
        features = self.encoder(volumes[:, None])
        return Encoding(self.mu(features), self.log_var(features), self.pose(features),
                        self.global_weight(features))

    def forward(self, volumes: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, Encoding]:
        """Training pass: encode, sample z, decode in the predicted pose with the final conv."""
        enc = self.encode(volumes)
        z = enc.mu
        if sample:
            z = z + torch.randn_like(z) * torch.exp(0.5 * enc.log_var)
        return self.decoder(z, enc.pose, enc.global_weight), enc

    def identity_pose(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """CryoLens's "identity" decode: pose (1, 0, 0, 0) (1 rad about a zero axis, R = I) and
        global-weight logit 1.0 (amplitude sigmoid(1) = 0.731)."""
        pose = torch.zeros(batch, self.config.pose_dims, device=device)
        pose[:, 0] = 1.0
        if self.config.pose_dims == 1:
            pose[:, 0] = 0.0
        return pose, torch.ones(batch, 1, device=device)
