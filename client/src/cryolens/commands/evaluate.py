"""``cryolens evaluate``: score a model on held-out simulated particles."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    e = subparsers.add_parser(
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
    e.add_argument("--leave-family-out", action="store_true",
                   help="also score shapes and proteins never used in training, per shape "
                        "family, against the best-sigma blur; writes generalisation.json")
    e.add_argument("--per-group", type=int, default=16,
                   help="with --leave-family-out: instances per shape family (each imaged "
                        "twice) and particles per held-out protein")
    e.add_argument("--out", default="evaluation", help="folder for evaluation.json and slices.png")
    e.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
    if args.leave_family_out:
        from cryolens.generalisation import evaluate_generalisation, format_generalisation, to_json

        groups, embeddings = evaluate_generalisation(engine, snrs=args.snr,
                                                     per_group=args.per_group)
        (out / "generalisation.json").write_text(to_json(groups, embeddings) + "\n")
        print(format_generalisation(groups, embeddings))
        print(f"wrote {out / 'generalisation.json'}")
    return 0
