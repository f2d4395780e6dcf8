"""Give a trained CryoLens-architecture model more affinity latent dimensions, decoding as before.

Usage: python scripts/widen_demo.py SOURCE OUT.safetensors --affinity-dims 40

The new dimensions sit after the old affinity ones (the free ones move up). The decoder's
affinity MLPs read them through new input columns set to zero, so the widened model reconstructs
exactly what the source did; the encoder's mu rows for them start small and random, their
log-variance rows at the mean of the old ones, and training (``cryolens train --init OUT``)
decides what they carry. Issue 30 asks whether the demo's 12 affinity dimensions limit what it
can draw; this makes the comparison with the same training from the same start.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from cryolens.checkpoints import load_model
from cryolens.model import CryoLensVAE
from cryolens.train import save_checkpoint


def widen(model: CryoLensVAE, affinity_dims: int, seed: int = 0) -> CryoLensVAE:
    old = model.config
    extra = affinity_dims - old.affinity_dims
    if extra <= 0:
        raise ValueError(f"affinity_dims must grow from {old.affinity_dims}, got {affinity_dims}")
    config = replace(old, latent_dims=old.latent_dims + extra, affinity_dims=affinity_dims)
    wide = CryoLensVAE(config)
    state = model.state_dict()
    new = wide.state_dict()
    # latent index of each old dimension in the widened latent
    keep = list(range(old.affinity_dims)) + list(range(affinity_dims, config.latent_dims))
    added = list(range(old.affinity_dims, affinity_dims))
    generator = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        target = new[key]
        if target.shape == value.shape:
            target.copy_(value)
        elif key in ("mu.weight", "log_var.weight", "mu.bias", "log_var.bias"):
            target[keep] = value
            if key == "mu.weight":
                target[added] = 0.1 * value.std() * torch.randn(
                    (extra, value.shape[1]), generator=generator)
            elif key == "mu.bias":
                target[added] = 0.0
            else:
                target[added] = value[: old.affinity_dims].mean(0)
        elif key.startswith("decoder.affinity_") and key.endswith(".0.weight"):
            target.zero_()
            target[:, : old.affinity_dims] = value  # the new columns read nothing yet
        else:
            raise ValueError(f"no rule to widen {key}: {tuple(value.shape)} -> "
                             f"{tuple(target.shape)}")
    wide.load_state_dict(new)
    return wide


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="checkpoint: a name (demo), a file or a URL")
    parser.add_argument("out", type=Path, help="the widened checkpoint (.safetensors)")
    parser.add_argument("--affinity-dims", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, _ = load_model(args.source)
    wide = widen(model.eval(), args.affinity_dims, args.seed)
    save_checkpoint(args.out, wide.eval(), {"config": wide.config.to_dict(),
                                            "widened_from": str(args.source)})
    print(json.dumps(wide.config.to_dict()))


if __name__ == "__main__":
    main()
