"""The ``cryolens`` console: train, evaluate, inspect checkpoints, serve.

Each sub-command is a thin layer over the library and has one function that adds its parser
(``add_<command>_parser``, listed in ``SUBCOMMANDS``); ``cryolens <command> --help`` lists its
options with their defaults. ``cryolens serve`` hands the rest of its command line to the
server's own parser. A failure prints one line, ``cryolens: <message>``, and exits 1 (usage
errors exit 2); ``--log-level debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

from cryolens import __version__, heap
from cryolens.cliutil import ArgumentParser, fail, positive_int, positive_number


def _train(args: argparse.Namespace) -> int:
    from cryolens.train import TrainSettings, train

    names = {f.name for f in fields(TrainSettings)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    settings = TrainSettings(**given)
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

    return serve(rest, prog="cryolens serve") or 0


def _common_options() -> argparse.ArgumentParser:
    """Options every sub-command has."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=str.upper, default="WARNING",
                        choices=("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"),
                        help="logging level, any case; DEBUG also prints the traceback of a "
                             "failure")
    return common


def add_train_parser(sub, common: argparse.ArgumentParser) -> None:
    from cryolens.train import TrainSettings

    d = TrainSettings()
    t = sub.add_parser(
        "train", parents=[common],
        help="train a model on simulated particles, or fine-tune on yours",
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
                   help="torch CPU threads (default: PyTorch's choice, one per core)")
    t.add_argument("--data", default=d.data,
                   help="fine-tune on these particles: a folder of MRC files, an .npy or an "
                        ".h5 stack (default: simulated particles)")
    t.add_argument("--init", default=d.init,
                   help="checkpoint to start from: name, path or URL (default: a new model)")
    t.add_argument("--structures", nargs="+", default=d.structures,
                   help="simulate only these structures, by name (default: all packaged ones)")
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
    t.set_defaults(run=_train)


def add_evaluate_parser(sub, common: argparse.ArgumentParser) -> None:
    e = sub.add_parser(
        "evaluate", parents=[common], help="score a model on held-out simulated particles",
        description="Score a model on held-out simulated particles: reconstruction correlation, "
                    "a blurred-input baseline\nand 1-NN structure accuracy of the embeddings, "
                    "per SNR; writes evaluation.json and slices.png.",
        epilog="example:\n"
               "  cryolens evaluate --checkpoint runs/demo/final.safetensors --out evaluation/")
    e.add_argument("--checkpoint", "-c", default="demo",
                   help="checkpoint: a name (demo, v001), an http(s) URL or a local file")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    e.add_argument("--snr", type=float, nargs="+", default=[5.0, 1.0],
                   help="signal-to-noise ratios to evaluate at")
    e.add_argument("--per-structure", type=int, default=20,
                   help="held-out particles per structure and SNR")
    e.add_argument("--out", default="evaluation", help="folder for evaluation.json and slices.png")
    e.set_defaults(run=_evaluate)


def add_info_parser(sub, common: argparse.ArgumentParser) -> None:
    i = sub.add_parser(
        "info", parents=[common], help="list named checkpoints, or describe one",
        description="Without an argument, list the named checkpoints; with one, load it and "
                    "print its\nconfiguration, parameter count and sha256 as JSON.",
        epilog="examples:\n  cryolens info\n  cryolens info demo\n"
               "  cryolens info /models/my_model.ckpt")
    i.add_argument("checkpoint", nargs="?",
                   help="a name (demo, v001), an http(s) URL or a local file (default: list the "
                        "names)")
    i.set_defaults(run=_info)


def add_serve_parser(sub, common: argparse.ArgumentParser) -> None:
    # Parsed by the server's own parser (see main): "cryolens serve --help" lists its options.
    sub.add_parser("serve", add_help=False,
                   help="run the REST server (the options of cryolens-server; see "
                        "'cryolens serve --help')")


#: One function per sub-command; a new sub-command adds its function here.
SUBCOMMANDS = (add_info_parser, add_serve_parser, add_train_parser, add_evaluate_parser)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="cryolens",
        description="CryoLens: embed, reconstruct and picture your 48^3 cryo-ET particles; "
                    "inspect, train and evaluate\nmodels, and serve them over HTTP.\n"
                    "'cryolens COMMAND --help' lists the options of a command. A failure is one "
                    "line on stderr\n(exit status 1); add --log-level debug to see its "
                    "traceback.")
    parser.add_argument("--version", action="version", version=f"cryolens {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()
    from cryolens.commands import register  # embed, reconstruct, show, map: listed first

    register(sub, common)
    for add in SUBCOMMANDS:
        add(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    args = build_parser().parse_args(argv)
    heap.tune()  # the engine's batches without page faults (cryolens/heap.py)
    # force: each call (tests call main in-process) logs to the stderr of its own time
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    try:
        return args.run(args)
    except (Exception, KeyboardInterrupt) as exc:
        if args.log_level == "DEBUG":
            raise
        return fail("cryolens", exc)


if __name__ == "__main__":
    sys.exit(main())
