"""``cryolens info [CHECKPOINT]``: the named checkpoints, or one checkpoint's configuration,
parameter count and sha256, and whether it is the published v001 (its sha256 against the
registry's)."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "info", parents=[common], description=__doc__.split("\n\n")[0],
        help="list named checkpoints, or describe one")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a name (demo, v001), URL or file (default: list the named ones)")
    p.add_argument("--json", action="store_true", help="print JSON (default: text)")
    p.set_defaults(run=run)


def describe(source) -> dict:
    """What ``cryolens info`` reports about one checkpoint, as a dict."""
    from cryolens.checkpoints import REGISTRY, load_model

    model, info = load_model(source)
    published = REGISTRY["v001"].sha256
    return {
        "name": info.display_name,
        "sha256": info.sha256,
        "layout": info.layout,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "config": info.config.to_dict(),
        "published_v001": info.sha256 == published,
        "v001_sha256": published,
    }


def run(args: argparse.Namespace) -> int:
    from cryolens.checkpoints import list_checkpoints

    if args.checkpoint is None:
        for row in list_checkpoints():
            where = "available here" if row["available"] else "downloaded on first use"
            print(f"{row['name']:<8} {row['description']} ({where})")
        return 0
    facts = describe(args.checkpoint)
    if getattr(args, "json", False):
        print(json.dumps(facts, indent=2))
        return 0
    print(f"checkpoint   {facts['name']}")
    print(f"sha256       {facts['sha256']}")
    print(f"layout       {facts['layout']}")
    print(f"parameters   {facts['parameters']:,}")
    verdict = "yes (sha256 matches the registry's v001)" if facts["published_v001"] else \
        "no (sha256 differs from the registry's v001 " + facts["v001_sha256"][:12] + "...)"
    print(f"published v001: {verdict}")
    print("configuration:")
    for key, value in facts["config"].items():
        print(f"  {key:<14} {value}")
    return 0
