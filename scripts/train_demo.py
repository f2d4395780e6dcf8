"""Train the shipped ``demo`` model and ship it: one command (the model card's recipe).

    python scripts/train_demo.py                  # the last stage, from the stage-4 demo
    python scripts/train_demo.py --from-scratch   # every stage, from random weights

The stages (``STAGES``; each starts from the one before, in a folder of its own under
``--out-dir``):

1. ``structures``: the 14 packaged structures, reconstruction in the predicted and in the true
   pose, pose loss, contrastive term; a fresh model of the demo's shape.
2. ``pose``: the pose head alone learns (teacher decode only), poses widened from 45 degrees
   around the identity to all of SO(3).
3. ``predicted-pose``: reconstruction in the predicted pose only, as ``evaluate`` and the server
   decode.
4. ``shapes`` (issue 30): half of each batch the 14 structures, half two views each of fresh
   random instances of the training shape families (``cryolens.shapes``); rings and helical
   filaments are held out for ``cryolens evaluate --leave-family-out``.
5. ``shapes-again``: the same for another schedule (warm-up, cosine to zero), from the end of
   the first: the shipped demo.

Without ``--from-scratch`` the two shape stages run, from the stage-4 file of commit 173c602
(the demo before issue 30), which needs this checkout's git history. Each stage's learning
rate anneals over its minutes of wall time (``--time-scale`` multiplies them), so another
machine takes another number of steps: the recipe is reproducible, the weights not bit for bit.
A stage whose folder already holds ``final.safetensors`` is skipped, and an interrupted stage
resumes from its last checkpoint, so re-running the command continues it.
"""
from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ship_demo import main as ship

from cryolens.shapes import TRAINING_FAMILIES
from cryolens.train import TrainSettings, train

REPO = Path(__file__).resolve().parents[1]
#: The demo before issue 30's stage, which the last stage starts from by default.
STAGE4_COMMIT = "173c602"


@dataclass(frozen=True)
class Stage:
    name: str
    minutes: float  # wall-time budget on one core of the 2-core development machine
    settings: dict = field(default_factory=dict)  # TrainSettings fields


#: The shape-family stage's settings (run twice: a second schedule from the first's end).
SHAPES = dict(batch_size=32, lr=4e-4, steps=100000, w_recon=1, w_teacher=0, w_pose=2,
              real_share=0.5, families=list(TRAINING_FAMILIES))
STAGES = (
    Stage("structures", 100, dict(batch_size=32, lr=1.5e-3, steps=20000)),
    Stage("pose", 40, dict(batch_size=32, lr=7e-4, steps=5000, w_recon=0, w_pose=3,
                           curriculum_steps=5000, start_angle=45)),
    Stage("predicted-pose", 65, dict(batch_size=32, lr=4e-4, steps=20000, w_recon=1,
                                     w_teacher=0, w_pose=2)),
    Stage("shapes", 120, SHAPES),
    Stage("shapes-again", 105, SHAPES),
)


def stage4_file(out_dir: Path) -> Path:
    """The stage-4 demo from this checkout's history."""
    path = out_dir / "stage4.safetensors"
    if not path.exists():
        blob = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{STAGE4_COMMIT}:src/cryolens/data/demo.safetensors"],
            check=True, capture_output=True).stdout
        path.write_bytes(blob)
    return path


def run_stages(stages, out_dir: Path, init: str | None, *, device: str, threads: int | None,
               workers: int, time_scale: float, stage_steps: int | None,
               progress: bool) -> Path:
    """Run ``stages`` in order, each from the previous one's final checkpoint (the first from
    ``init``, or from random weights when None); return the last final checkpoint."""
    for number, stage in enumerate(stages, 1):
        folder = out_dir / f"{number}-{stage.name}"
        final = folder / "final.safetensors"
        if final.exists():
            print(f"stage {stage.name}: done before ({final})")
        else:
            settings = dict(stage.settings, out_dir=str(folder), init=init, device=device,
                            threads=threads, workers=workers, seed=0, checkpoint_every=250,
                            max_minutes=stage.minutes * time_scale)
            if stage_steps:
                settings["steps"] = min(settings["steps"], stage_steps)
            started = time.time()
            train(TrainSettings(**settings), progress=progress)
            print(f"stage {stage.name}: {(time.time() - started) / 60:.1f} min -> {final}")
        init = str(final)
    return Path(init)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/demo-recipe"))
    parser.add_argument("--from-scratch", action="store_true",
                        help="run every stage from random weights (about 7.2 hours on one "
                             "core of the 2-core development machine)")
    parser.add_argument("--init", help="start the shape stages from this checkpoint instead "
                                       "of the stage-4 demo")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for PyTorch and numpy (default 1: the stages' "
                             "minutes were set on one core)")
    parser.add_argument("--workers", type=int, default=0,
                        help="data-loading processes (on a GPU machine, a few)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply every stage's minutes by this")
    parser.add_argument("--stage-steps", type=int,
                        help="at most this many steps a stage (a quick check of the chain)")
    parser.add_argument("--no-ship", action="store_true",
                        help="leave the packaged demo as it is")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.from_scratch:
        stages, init = STAGES, None
    else:
        stages, init = STAGES[-2:], args.init or str(stage4_file(args.out_dir))
    final = run_stages(stages, args.out_dir, init, device=args.device, threads=args.threads,
                       workers=args.workers, time_scale=args.time_scale,
                       stage_steps=args.stage_steps, progress=not args.quiet)
    print(f"trained: {final}")
    if not args.no_ship:
        ship(str(final))


if __name__ == "__main__":
    main()
