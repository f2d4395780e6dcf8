"""Where a model loses a shape: its encoder, its decoder, or the splat render itself.

Run: python bench/decoder_ceiling.py [--checkpoint demo] [--families ring filament rod worm]
         [--instances 6] [--steps 150] [--splat-steps 200] [--snr 5]

For each shape family (``cryolens.shapes``; the held-out proteins with ``proteins``) it takes
particles of ``cryolens evaluate --leave-family-out``'s own set at that SNR (the first view of
each instance; the held-out proteins in turn) and prints the mean Pearson r with the noise-free
particle of:

- ``encoded``: the decoder fed the encoder's mu, in the true pose (what the encoder gives it);
- ``best latent``: the decoder fed a latent (and pose and global weight) fitted by Adam to the
  noise-free particle itself, starting from the encoder's: how well the decoder can draw the
  shape at all, whatever an encoder might give it;
- ``free splats``: as many splats as the model has, their centres, weights and sigmas fitted
  freely through the model's own render and final convolution: what the representation allows
  once the latent-to-splat networks are out of the way;
- ``best blur``: the input blurred with the best sigma (the leave-family-out baseline).

Issue 30 (a demo that beats the best blur on shapes it never saw) reads these: a decoder whose
best latent stays below the blur cannot pass, however good its encoder. The fits are local
optimisations from one start, so their figures are lower bounds of the true ceilings.
"""
from __future__ import annotations

import argparse

import _path  # noqa: F401  (bench/ after the installed packages on sys.path)
import numpy as np
import torch

from cryolens.checkpoints import load_model
from cryolens.evaluate import pearson
from cryolens.generalisation import PROTEINS, SNRS, best_blur, evaluation_set
from cryolens.model.decoder import Splats
from cryolens.model.rotation import matrix_to_axis_angle
from cryolens.synth import ParticleBatch


def particles(group: str, n: int, snr: float) -> ParticleBatch:
    """``n`` particles of the leave-family-out evaluation's own set at ``snr``: a family's
    first view of its first ``n`` instances, or the held-out proteins in turn."""
    name = PROTEINS if group == "proteins" else group
    per_group = -(-n // 3) if name == PROTEINS else n
    batch, _ = evaluation_set(name, snr, per_group, snr_index=SNRS.index(snr))
    pick = (np.arange(n) % 3 * per_group + np.arange(n) // 3 if name == PROTEINS
            else np.arange(n) * 2)
    return ParticleBatch(batch.particles[pick], batch.clean[pick], batch.rotations[pick],
                         batch.shifts[pick], batch.labels[pick], batch.names)


def fit_latent(model, batch, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """r of the decoded mu in the true pose, and of the fitted latent."""
    target = torch.from_numpy(batch.clean)
    with torch.no_grad():
        enc = model.encode(torch.from_numpy(batch.particles))
    pose = matrix_to_axis_angle(torch.from_numpy(batch.rotations))
    with torch.no_grad():
        encoded = pearson(model.decoder(enc.mu, pose, enc.global_weight).numpy(), batch.clean)
    params = [t.clone().requires_grad_(True) for t in (enc.mu, pose, enc.global_weight)]
    optimiser = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model.decoder(*params), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return encoded, pearson(model.decoder(*params).numpy(), batch.clean)


def fit_splats(model, batch, steps: int, rng: np.random.Generator) -> np.ndarray:
    """r of freely fitted splats (as many as the model has), started on the particle's
    densest voxels, through the model's render and final convolution."""
    decoder, config = model.decoder, model.config
    n = config.n_splats
    # the box's voxel i sits at grid coordinate -1 + 2 (i + margin) / (render_size - 1)
    step = 2 / (config.render_size - 1)
    starts = []
    for clean in batch.clean:
        strong = np.argwhere(clean <= np.quantile(clean, 0.03))  # dark protein: most negative
        zyx = strong[rng.integers(len(strong), size=n)].astype(np.float32)
        starts.append((-1 + step * (zyx[:, ::-1] + config.margin)).T)  # rows x, y, z
    centres = torch.tensor(np.stack(starts)).requires_grad_(True)
    weights = torch.zeros(len(starts), n, requires_grad=True)
    sigmas = torch.full((len(starts), n), -1.0, requires_grad=True)
    optimiser = torch.optim.Adam([centres, weights, sigmas], lr=0.01)
    target = torch.from_numpy(batch.clean)

    def draw():
        scale = torch.sigmoid(sigmas) * (config.sigma_max - config.sigma_min) + config.sigma_min
        splats = Splats(centres, torch.sigmoid(weights), scale, n)
        return decoder.final_convolution(decoder.render(splats, "conv"), method="fft")

    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(draw(), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return pearson(draw().numpy(), batch.clean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--families", nargs="+", default=["ring", "filament", "rod", "worm"],
                        help=f"families of cryolens.shapes, or proteins ({PROTEINS})")
    parser.add_argument("--instances", type=int, default=6)
    parser.add_argument("--steps", type=int, default=150, help="Adam steps of the latent fit")
    parser.add_argument("--splat-steps", type=int, default=200,
                        help="Adam steps of the free-splat fit (0: skip it)")
    parser.add_argument("--snr", type=float, default=SNRS[0], choices=SNRS,
                        help="an SNR of the evaluation (its particles are the evaluation's)")
    args = parser.parse_args()
    model, _ = load_model(args.checkpoint)
    model.eval().requires_grad_(False)
    print(f"{args.checkpoint}: {model.config.affinity_dims} affinity + "
          f"{model.config.free_dims} free latent dims, {model.config.n_splats} splats; "
          f"{args.instances} particles a family at SNR {args.snr:g}; mean r (min)")
    print("| family | encoded | best latent | free splats | best blur |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for group in args.families:
        batch = particles(group, args.instances, args.snr)
        encoded, fitted = fit_latent(model, batch, args.steps)
        splats = fit_splats(model, batch, args.splat_steps, rng) if args.splat_steps else None
        blur, _ = best_blur(batch.particles, batch.clean)
        cells = [f"{r.mean():.3f} ({r.min():.3f})" if r is not None else "-"
                 for r in (encoded, fitted, splats)]
        print(f"| {group} | {' | '.join(cells)} | {blur:.3f} |", flush=True)


if __name__ == "__main__":
    main()
