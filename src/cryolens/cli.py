"""The ``cryolens`` console: train, evaluate, inspect checkpoints, serve.

Each sub-command is a thin layer over the library; ``cryolens <command> --help`` lists options.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from cryolens.train import TrainSettings, train

    names = {f.name for f in fields(TrainSettings)}
    settings = TrainSettings(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    final = train(settings, resume=not args.fresh, progress=not args.quiet)
    print(f"final checkpoint: {final}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cryolens.engine import Engine
    from cryolens.evaluate import evaluate, format_table, write_report

    engine = Engine.from_checkpoint(args.checkpoint, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = evaluate(engine, snrs=args.snr, per_structure=args.per_structure,
                       png=out / "slices.png")
    write_report(out / "evaluation.json", reports)
    print(format_table(reports))
    print(f"wrote {out / 'evaluation.json'} and {out / 'slices.png'}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from cryolens.commands.info import run

    return run(args)


def _serve(rest: list[str]) -> int:
    from cryolens.server.minimal_cryolens_server import main as serve

    return serve(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cryolens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on simulated particles, or fine-tune on yours")
    t.add_argument("--out-dir", default="runs/demo", help="checkpoints and log.jsonl go here")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="cpu, cuda or auto")
    t.add_argument("--workers", type=int,
                   help="data-loading processes (keep 0 on a CPU-only machine: they compete "
                        "with training for the cores)")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--data", help="fine-tune on these particles: MRC folder, .npy or .h5 stack")
    t.add_argument("--init", help="checkpoint to start from (name, path or URL)")
    t.add_argument("--structures", nargs="+", help="simulate only these structures (names)")
    t.add_argument("--snr-min", type=float)
    t.add_argument("--snr-max", type=float)
    t.add_argument("--curriculum-steps", type=int,
                   help="widen simulated poses from --start-angle to all of SO(3) over these steps")
    t.add_argument("--start-angle", type=float, help="degrees from the identity at step 0")
    t.add_argument("--w-recon", type=float, help="weight of the predicted-pose reconstruction (0 skips it)")
    t.add_argument("--w-teacher", type=float, help="weight of the true-pose reconstruction")
    t.add_argument("--w-pose", type=float, help="weight of the symmetry-aware pose loss")
    t.add_argument("--w-contrast", type=float, help="weight of the contrastive term")
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--max-minutes", type=float, help="stop and save after this long")
    t.add_argument("--fresh", action="store_true", help="ignore checkpoints already in --out-dir")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=_train)

    e = sub.add_parser("evaluate", help="score a model on held-out simulated particles")
    e.add_argument("--checkpoint", "-c", default="demo")
    e.add_argument("--device", default="auto")
    e.add_argument("--snr", type=float, nargs="+", default=[5.0, 1.0])
    e.add_argument("--per-structure", type=int, default=20)
    e.add_argument("--out", default="evaluation")
    e.set_defaults(run=_evaluate)

    i = sub.add_parser("info", help="list named checkpoints, or describe one")
    i.add_argument("checkpoint", nargs="?")
    i.set_defaults(run=_info)

    sub.add_parser("serve", help="run the REST server (same options as cryolens-server)",
                   add_help=False)
    from cryolens.commands import register  # embed, reconstruct, show, map

    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
