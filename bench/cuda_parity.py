"""Parity of the engine on a CUDA device against the reference golden arrays (CPU-computed).

Run on a GPU machine: python bench/cuda_parity.py CHECKPOINT GOLDEN.npz
(GOLDEN is ../shared/parity/golden_dev.npz or a subset of its arrays). Prints max errors and
the tolerance each is held to; exits non-zero if any is exceeded.
"""
from __future__ import annotations

import sys

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import numpy as np
import torch

from cryolens.engine import Engine


def main(checkpoint: str, golden_path: str, device: str = "cuda") -> int:
    g = np.load(golden_path)
    engine = Engine.from_checkpoint(checkpoint, device=device)
    dec = engine.model.decoder

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(engine.device)

    rows = []
    f = engine.features(g["inputs"])
    rows += [("mu", f.embedding, g["mu"], 1e-6), ("log_var", f.log_variance, g["log_var"], 1e-6),
             ("pose", f.pose_axis_angle, g["pose_raw"], 1e-6),
             ("quaternion", f.pose, g["quaternion"], 1e-6),
             ("global_weight", f.global_weight, g["global_weight"][:, 0], 1e-6)]
    r = engine.reconstruct(g["inputs"], segments=True, denormalise=False)
    rows += [("dec_id_conv", r.reconstruction, g["dec_id_conv"], 1e-5),
             ("seg_id_affinity_conv", r.affinity_reconstruction, g["seg_id_affinity_conv"], 1e-5),
             ("seg_id_free_conv", r.free_reconstruction, g["seg_id_free_conv"], 1e-5)]
    full = engine.reconstruct(g["inputs"])
    rel = np.abs(full.reconstruction - g["recon_pipeline"]).max(axis=(1, 2, 3)) / np.maximum(
        np.ptp(g["recon_pipeline"], axis=(1, 2, 3)), g["norm_std"])
    rows.append(("recon_pipeline (relative)", rel, np.zeros_like(rel), 1e-5))
    mu = t(g["mu"])
    with torch.inference_mode():
        for name, pose, gw in [("dec_pred_conv", t(g["pose_raw"]), t(g["global_weight"])),
                               ("dec_explicit_conv", t(g["explicit_pose"]), t(g["explicit_gw"]))]:
            out = dec.final_convolution(dec.render(dec.splats(mu, pose, gw), "conv"))
            rows.append((name, out.cpu().numpy(), g[name], 1e-5))
        z = dec.splats(t(g["zsweep_z"]), t(g["zsweep_pose"]), t(g["zsweep_gw"]))
        rows.append(("zsweep_conv", dec.final_convolution(dec.render(z, "conv")).cpu().numpy(),
                     g["zsweep_conv"], 1e-5))
    failed = 0
    for name, ours, ref, tol in rows:
        err = float(np.abs(np.asarray(ours, np.float64) - ref).max())
        ok = err <= tol
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name:<28} max err {err:.2e} (tol {tol:.0e})")
    print(f"device {engine.device}; {len(rows) - failed}/{len(rows)} within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    if not 3 <= len(sys.argv) <= 4 or sys.argv[1] in ("-h", "--help"):
        sys.exit(f"usage: python {sys.argv[0]} CHECKPOINT GOLDEN.npz [DEVICE]\n\n"
                 f"{__doc__.splitlines()[0]}")
    sys.exit(main(*sys.argv[1:4]))
