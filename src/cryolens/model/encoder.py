"""The CryoLens encoder: four stride-2 3-D convolutions, flattened to one feature vector."""
from __future__ import annotations

from torch import nn

from cryolens.model.config import ENCODER_CHANNELS


class Encoder(nn.Module):
    """(B, 1, S, S, S) -> (B, 64 * (S/16)^3). Keys ``model.{0,2,4,6}`` as in CryoLens."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for channels in ENCODER_CHANNELS:
            layers += [nn.Conv3d(previous, channels, 3, stride=2, padding=1), nn.ReLU()]
            previous = channels
        layers.append(nn.Flatten())
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)
