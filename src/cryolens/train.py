"""Training and fine-tuning of CryoLens-architecture models, on simulated or on your own particles.

The same segmented architecture and parameter names as CryoLens, so :mod:`cryolens.checkpoints`
loads what this writes. Checkpoints are safetensors; the loss log is JSON lines.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cryolens.engine import resolve_device, zscore
from cryolens.mix import POSE_POINTS, MixedStream, SimulatedStream, StepStream, pose_points
from cryolens.model import CryoLensConfig, CryoLensVAE
from cryolens.model.rotation import matrix_to_axis_angle, pose_to_matrix
from cryolens.synth import VOXEL_SIZE_A

#: The shipped demo model's shape: CryoLens's architecture, fewer latents and splats.
DEMO_CONFIG = CryoLensConfig(latent_dims=16, affinity_dims=12, n_affinity=192, n_free=48)


@dataclass
class TrainSettings:
    """Everything that determines a training run (saved with every checkpoint)."""

    out_dir: str = "runs/demo"
    steps: int = 20000
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    # simulated data (when ``data`` is None)
    snr_min: float = 1.0
    snr_max: float = 10.0
    tilt_range: float = 60.0
    max_shift: float = 2.0
    # pose curriculum: poses within start_angle of the identity at step 0, widening linearly
    # to all of SO(3) at curriculum_steps (0: all of SO(3) from the start)
    curriculum_steps: int = 0
    start_angle: float = 45.0
    structures: list[str] | None = None  # names to simulate (default: all packaged structures)
    # procedural shape families mixed in (cryolens.shapes), new instances every batch, making
    # up 1 - real_share of each batch (cryolens.mix)
    families: list[str] | None = None
    real_share: float = 0.5
    # real particles to fine-tune on: a folder of MRC files, an .npy or an .h5 stack
    data: str | None = None
    init: str | None = None  # checkpoint to start from (fine-tuning)
    # loss weights
    beta_kl: float = 1e-3
    # decode in the predicted pose, and in the true pose (teaches the decoder a canonical frame);
    # a weight of 0 skips that decode, which halves the cost of a step
    w_recon: float = 1.0
    w_teacher: float = 1.0
    w_pose: float = 1.0  # symmetry-aware pose loss: overlap of the structure rotated both ways
    w_contrast: float = 0.1  # structure-contrastive term on the affinity embedding
    temperature: float = 0.1
    # model shape for a new model
    latent_dims: int = DEMO_CONFIG.latent_dims
    affinity_dims: int = DEMO_CONFIG.affinity_dims
    n_affinity: int = DEMO_CONFIG.n_affinity
    n_free: int = DEMO_CONFIG.n_free
    # bookkeeping
    max_minutes: float | None = None  # stop early (and save) after this long
    checkpoint_every: int = 500
    log_every: int = 25
    workers: int = 0
    threads: int | None = None
    extra: dict = field(default_factory=dict)

    def model_config(self) -> CryoLensConfig:
        return CryoLensConfig(latent_dims=self.latent_dims, affinity_dims=self.affinity_dims,
                              n_affinity=self.n_affinity, n_free=self.n_free)


# -- data -----------------------------------------------------------------------------------
class ParticleStack(StepStream):
    """Your own particles, reconstructed as themselves (no labels, no known pose)."""

    def __init__(self, volumes: np.ndarray, settings: TrainSettings, start_step: int) -> None:
        super().__init__(settings, start_step)
        self.volumes = volumes

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.settings.seed, step])
        pick = rng.integers(0, len(self.volumes), self.settings.batch_size)
        # the same normalisation the engine applies at inference
        batch = zscore(np.ascontiguousarray(self.volumes[pick], np.float32)).volumes
        return {"particles": torch.from_numpy(batch), "target": torch.from_numpy(batch)}


def load_particles(path: str | os.PathLike) -> np.ndarray:
    """(N, S, S, S) particles from any input :mod:`cryolens.io` reads (a folder of MRC files,
    an MRC stack, ``.npy``, HDF5 or zarr), checked against the model's box and voxel size."""
    from cryolens.io import load_particles as read_all

    return read_all(path)[0]


# -- model initialisation -------------------------------------------------------------------
def initialise(model: CryoLensVAE) -> None:
    """A start that renders sensible volumes: splats near the centre, a blur as final conv."""
    dec = model.decoder
    with torch.no_grad():
        for name in ("affinity_centroids", "free_centroids"):
            if hasattr(dec, name):
                getattr(dec, name)[4].weight.mul_(0.5)
        dec._decoder[1].weight.fill_(1.0)
        dec._decoder[1].bias.zero_()
        r = torch.arange(9, dtype=torch.float32) - 4
        g = torch.exp(-(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) / 2)
        dec._decoder[2].weight.copy_((g / g.sum() * 3.0)[None, None])
        dec._decoder[2].bias.zero_()


# -- losses ---------------------------------------------------------------------------------
def kl_divergence(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(1).mean()


def contrastive(embedding: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss: same-structure embeddings together, others apart."""
    z = nn.functional.normalize(embedding, dim=1)
    logits = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, -1e9)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    count = positives.sum(1)
    valid = count > 0
    if not valid.any():
        return embedding.new_zeros(())
    mean_pos = (log_prob * positives).sum(1)[valid] / count[valid]
    return -mean_pos.mean()


#: Length scales (voxels) of the pose loss: a wide one for a smooth basin, a narrow one for detail.
POSE_SCALES = (3.0, 1.0)


def pose_loss(points: torch.Tensor, weights: torch.Tensor, predicted: torch.Tensor,
              true: torch.Tensor, self_overlap: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``1 - overlap(pred, true) / overlap(true, true)`` (see :class:`PoseReference`).

    points: (B, K, 3) rows (x, y, z), voxels; weights: (B, K); predicted, true: (B, 3, 3)
    rotations; ``self_overlap``: the points' own overlap where already known."""
    if self_overlap is None:
        self_overlap = _overlap(points, points, weights, weights)
    a = points @ predicted.transpose(1, 2)  # rows (R x_i)^T
    b = points @ true.transpose(1, 2)
    return (1 - _overlap(a, b, weights, weights) / self_overlap).mean()


class PoseReference:
    """Each structure as a few weighted points (voxel units), for the pose loss.

    The pose loss compares the structure rotated by the predicted pose with the structure
    rotated by the true pose, as Gaussian densities: ``1 - overlap(pred, true) / overlap(true,
    true)`` at each of :data:`POSE_SCALES`. A rotation that maps the structure onto itself
    (apoferritin's 24, a ring's n-fold axis) costs nothing, so symmetric structures get no
    contradictory targets, unlike a loss on rotation matrices; and a pose that leaves a
    near-spherical structure looking the same costs little, which is what the reconstruction
    cares about.
    """

    def __init__(self, structures, voxel_size: float, n_points: int = POSE_POINTS, seed: int = 0):
        points, weights = pose_points(structures, np.random.default_rng(seed), n_points,
                                      voxel_size)
        self.points = torch.from_numpy(points)  # (S, K, 3) rows (x, y, z)
        self.weights = torch.from_numpy(weights)  # (S, K), sum 1
        self.self_overlap = _overlap(self.points, self.points, self.weights, self.weights)

    def to(self, device) -> PoseReference:
        for name in ("points", "weights", "self_overlap"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def loss(self, predicted: torch.Tensor, true: torch.Tensor, labels: torch.Tensor
             ) -> torch.Tensor:
        """predicted, true: (B, 3, 3) rotations; labels: (B,) structure indices."""
        return pose_loss(self.points[labels], self.weights[labels], predicted, true,
                         self.self_overlap[labels])


def _overlap(a: torch.Tensor, b: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """(B, len(POSE_SCALES)) overlap integrals of two weighted point clouds as Gaussian
    densities."""
    d2 = ((a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :]
          - 2 * a @ b.transpose(1, 2)).clamp_min(0)
    pair = wa[:, :, None] * wb[:, None, :]
    return torch.stack([(pair * torch.exp(d2 / (-4 * s * s))).sum((1, 2)) for s in POSE_SCALES], 1)


def training_step(model: CryoLensVAE, batch: dict, settings: TrainSettings,
                  reference: PoseReference | None = None) -> dict:
    """Losses for one batch. ``reference`` gives the pose loss on simulated (labelled) batches."""
    x = batch["particles"]
    target = batch["target"]
    enc = model.encode(x)
    z = enc.mu + torch.randn_like(enc.mu) * torch.exp(0.5 * enc.log_var)
    losses = {"kl": kl_divergence(enc.mu, enc.log_var)}
    total = settings.beta_kl * losses["kl"]
    simulated = "rotations" in batch
    if settings.w_recon > 0 or not simulated:
        out = model.decoder(z, enc.pose, enc.global_weight)
        losses["recon"] = nn.functional.mse_loss(out, target)
        total = total + (settings.w_recon if simulated else 1.0) * losses["recon"]
    if simulated:
        rot = batch["rotations"]
        if settings.w_teacher > 0:
            teacher = model.decoder(z, matrix_to_axis_angle(rot), enc.global_weight)
            losses["teacher"] = nn.functional.mse_loss(teacher, target)
            total = total + settings.w_teacher * losses["teacher"]
        losses["contrast"] = contrastive(enc.mu[:, : model.config.affinity_dims],
                                         batch["labels"], settings.temperature)
        total = total + settings.w_contrast * losses["contrast"]
        if "pose_points" in batch:  # mixed batches carry each particle's points
            losses["pose"] = pose_loss(batch["pose_points"], batch["pose_weights"],
                                       pose_to_matrix(enc.pose), rot)
        elif reference is not None:
            losses["pose"] = reference.loss(pose_to_matrix(enc.pose), rot, batch["labels"])
        if "pose" in losses:
            total = total + settings.w_pose * losses["pose"]
    losses["total"] = total
    return losses


# -- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(path: Path, model: CryoLensVAE, meta: dict) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"cryolens": json.dumps(meta)})
    os.replace(tmp, path)


def _latest(out_dir: Path) -> Path | None:
    found = sorted(out_dir.glob("step_*.safetensors"))
    return found[-1] if found else None


def _set_up_torch(settings: TrainSettings, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)


def _model_and_optimizer(settings: TrainSettings, device: torch.device, latest: Path | None
                         ) -> tuple[CryoLensVAE, torch.optim.Optimizer, int]:
    """The model to train (``settings.init``'s, or a fresh one) and its optimizer, both resumed
    from checkpoint ``latest`` when there is one; and the step to start from."""
    if settings.init and not latest:
        from cryolens.checkpoints import load_model

        model, _ = load_model(settings.init)
    else:
        model = CryoLensVAE(settings.model_config())
        initialise(model)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-5)
    start_step = 0
    if latest:
        model.load_state_dict(load_file(str(latest)), strict=False)
        opt_path = latest.with_suffix(".opt.pt")
        if opt_path.exists():
            optimizer.load_state_dict(torch.load(opt_path, map_location=device, weights_only=True))
        start_step = int(latest.stem.split("_")[1])
        torch.manual_seed(settings.seed + start_step)
    return model, optimizer, start_step


def _save_step(out_dir: Path, done: int, model: CryoLensVAE, optimizer: torch.optim.Optimizer,
               meta: dict) -> None:
    """Checkpoint step ``done`` (weights and optimizer), keeping the last two steps only."""
    path = out_dir / f"step_{done:07d}.safetensors"
    save_checkpoint(path, model, {**meta, "step": done})
    torch.save(optimizer.state_dict(), path.with_suffix(".opt.pt"))
    for old in sorted(out_dir.glob("step_*.safetensors"))[:-2]:
        old.unlink()
        old.with_suffix(".opt.pt").unlink(missing_ok=True)


def _dataset(settings: TrainSettings, start_step: int, device: torch.device):
    """The batches to train on, and the pose reference of the plain simulated stream."""
    if settings.data:
        return ParticleStack(load_particles(settings.data), settings, start_step), None
    if settings.families:  # mixed batches carry their own pose points
        return MixedStream(settings, start_step), None
    dataset = SimulatedStream(settings, start_step)
    return dataset, PoseReference(dataset.structures(), VOXEL_SIZE_A, seed=settings.seed).to(device)


def train(settings: TrainSettings, *, resume: bool = True, progress: bool = True) -> Path:
    """Train (or resume) and return the path of the final checkpoint.

    ``settings.threads`` bounds numpy's BLAS pool as well as PyTorch's (both given back
    afterwards): the simulator's matrix products otherwise take every core, and two runs side
    by side on two cores, each told one thread, took over 6x longer a step (their BLAS threads
    spun against each other).
    """
    if not settings.threads:
        return _train(settings, resume=resume, progress=progress)
    from threadpoolctl import threadpool_limits

    torch_threads = torch.get_num_threads()
    try:
        with threadpool_limits(limits=settings.threads, user_api="blas"):
            return _train(settings, resume=resume, progress=progress)
    finally:
        torch.set_num_threads(torch_threads)  # the caller's count back, as numpy's is


def _train(settings: TrainSettings, *, resume: bool, progress: bool) -> Path:
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    _set_up_torch(settings, device)

    started = time.time()
    latest = _latest(out_dir) if resume else None
    model, optimizer, start_step = _model_and_optimizer(settings, device, latest)

    def progress_at(step: int) -> float:
        """Fraction of the run done: by steps, or by time when a time limit is the tighter one
        (then the schedule no longer depends on the step alone, so such runs are not
        bit-reproducible across machines)."""
        done = step / settings.steps
        if settings.max_minutes:
            done = max(done, (time.time() - started) / (60 * settings.max_minutes))
        return min(1.0, done)

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / 200)
        return settings.lr * warm * 0.5 * (1 + math.cos(math.pi * progress_at(step)))

    dataset, reference = _dataset(settings, start_step, device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=settings.workers,
        persistent_workers=settings.workers > 0, pin_memory=device.type == "cuda",
        prefetch_factor=4 if settings.workers else None,
    )
    (out_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    log = open(out_dir / "log.jsonl", "a")  # noqa: SIM115 - kept open for the whole loop
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, initial=start_step, unit="step", dynamic_ncols=True)
    running: dict[str, float] = {}
    step = start_step
    meta = {"settings": asdict(settings), "config": model.config.to_dict()}
    # the datasets are endless streams: the steps alone end the loop
    for step, batch in zip(range(start_step, settings.steps), loader, strict=False):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        losses = training_step(model, batch, settings, reference)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        done = step + 1
        if done % settings.log_every == 0 or done == settings.steps:
            n = settings.log_every if done % settings.log_every == 0 else done % settings.log_every
            record = {"step": done, "elapsed_s": round(time.time() - started, 2),
                      "lr": lr_at(step), **{k: v / n for k, v in running.items()}}
            log.write(json.dumps(record) + "\n")
            log.flush()
            running = {}
            if bar:
                shown = {k: f"{record[k]:.4f}" for k in ("recon", "teacher", "pose") if k in record}
                bar.set_postfix(total=f"{record['total']:.4f}", **shown)
        if bar:
            bar.update(1)
        out_of_time = settings.max_minutes and time.time() - started > 60 * settings.max_minutes
        if done % settings.checkpoint_every == 0 or done == settings.steps or out_of_time:
            _save_step(out_dir, done, model, optimizer, meta)
        if out_of_time:
            break
    if bar:
        bar.close()
    log.close()
    final = out_dir / "final.safetensors"
    save_checkpoint(final, model.eval(), {**meta, "step": step + 1})
    return final
