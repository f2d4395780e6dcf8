"""``cryolens train``: train a model on simulated particles, or fine-tune one on yours.

Its options' defaults are those of :class:`cryolens.train.TrainSettings`, which comes with
cryolens-server and PyTorch; so ``cryolens --help`` lists ``train`` without building its
parser, and ``cryolens.cli`` builds it (:func:`build_parser`) only for ``cryolens train``.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

from cryolens.cliutil import ArgumentParser, positive_int, positive_number


def run(args: argparse.Namespace) -> int:
    from cryolens.train import TrainSettings, train

    names = {f.name for f in fields(TrainSettings)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    settings = TrainSettings(**given)
    final = train(settings, resume=not args.fresh, progress=not args.quiet)
    print(f"final checkpoint: {final}")
    return 0


HELP = "train a model on simulated particles, or fine-tune on yours"


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    """``train`` in ``cryolens --help``; ``cryolens train`` itself parses with
    :func:`build_parser`."""
    subparsers.add_parser("train", add_help=False, help=HELP)


def build_parser(common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser of ``cryolens train``; needs cryolens-server (ModuleNotFoundError without)."""
    from cryolens.train import TrainSettings

    d = TrainSettings()
    t = ArgumentParser(
        prog="cryolens train", parents=[common],
        description="Train a CryoLens model on simulated particles, or fine-tune one on your own "
                    "particles (--data).\nRe-running the same command resumes from the last "
                    "checkpoint in --out-dir.",
        epilog="examples:\n"
               "  cryolens train --out-dir runs/demo --steps 20000 --batch-size 32\n"
               "  cryolens train --out-dir runs/mine --init demo --data particles/ --steps 2000")
    t.add_argument("--out-dir", default=d.out_dir, help="checkpoints and log.jsonl go here")
    t.add_argument("--steps", type=positive_int, default=d.steps, help="training steps in all")
    t.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="particles per step")
    t.add_argument("--lr", type=positive_number, default=d.lr, help="learning rate (Adam)")
    t.add_argument("--seed", type=int, default=d.seed, help="random seed: same seed, same weights")
    t.add_argument("--device", default=d.device,
                   help="cpu, cuda, cuda:N or auto (CUDA when available)")
    t.add_argument("--workers", type=int, default=d.workers,
                   help="data-loading processes (keep 0 on a CPU-only machine: they compete "
                        "with training for the cores)")
    t.add_argument("--threads", type=positive_int, default=d.threads,
                   help="CPU threads, for PyTorch and numpy's BLAS alike (default: their own "
                        "choice, one per core)")
    t.add_argument("--data", default=d.data,
                   help="fine-tune on these particles: a folder of MRC files, an .npy or an "
                        ".h5 stack (default: simulated particles)")
    t.add_argument("--init", default=d.init,
                   help="checkpoint to start from: name, path or URL (default: a new model)")
    t.add_argument("--structures", nargs="+", default=d.structures,
                   help="simulate only these structures, by name (default: all packaged ones)")
    t.add_argument("--families", nargs="+", default=d.families,
                   help="mix in new random instances of these procedural shape families every "
                        "batch, from cryolens.shapes (default: the real structures only)")
    t.add_argument("--real-share", type=float, default=d.real_share,
                   help="share of each batch from the real structures when --families is given")
    t.add_argument("--snr-min", type=float, default=d.snr_min,
                   help="lowest signal-to-noise ratio of simulated particles")
    t.add_argument("--snr-max", type=float, default=d.snr_max,
                   help="highest signal-to-noise ratio of simulated particles")
    t.add_argument("--curriculum-steps", type=int, default=d.curriculum_steps,
                   help="widen simulated poses from --start-angle to all of SO(3) over these "
                        "steps (0: all of SO(3) from the start)")
    t.add_argument("--start-angle", type=float, default=d.start_angle,
                   help="degrees from the identity at step 0 of the curriculum")
    t.add_argument("--w-recon", type=float, default=d.w_recon,
                   help="weight of the predicted-pose reconstruction (0 skips it)")
    t.add_argument("--w-teacher", type=float, default=d.w_teacher,
                   help="weight of the true-pose reconstruction")
    t.add_argument("--w-pose", type=float, default=d.w_pose,
                   help="weight of the symmetry-aware pose loss")
    t.add_argument("--w-contrast", type=float, default=d.w_contrast,
                   help="weight of the contrastive term")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="save a checkpoint every this many steps")
    t.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="stop and save after this many minutes (default: no limit)")
    t.add_argument("--fresh", action="store_true",
                   help="ignore checkpoints already in --out-dir and start again")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=run)
    return t
