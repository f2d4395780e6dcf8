"""The CryoLens encoder: four stride-2 3-D convolutions, flattened to one feature vector."""
from __future__ import annotations

import torch
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
        if _one_particle_on_cpu(x):
            return self._forward_onednn(x)
        return self.model(x)

    def _forward_onednn(self, x):
        """The same layers with every convolution in oneDNN. torch's own choice sends a batch
        of one to its native im2col convolution (2-3x slower here: 1.3-1.5 vs 0.55-0.63 ms for
        v001's four layers on one x86 thread) and larger batches to oneDNN already; the results
        differ only in float32 rounding."""
        for layer in self.model:
            if isinstance(layer, nn.Conv3d):
                x = torch.mkldnn_convolution(x, layer.weight, layer.bias, layer.padding,
                                             layer.stride, layer.dilation, layer.groups)
            else:
                x = layer(x)
        return x


def _one_particle_on_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a float32 batch of one on a CPU, outside autograd, where oneDNN can
    run (it is part of torch's x86 and ARM builds, and may be switched off)."""
    return (x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)
