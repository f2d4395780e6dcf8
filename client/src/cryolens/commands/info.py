"""``cryolens info [CHECKPOINT]``: the named checkpoints, or one checkpoint's configuration,
parameter count and sha256, and which registry entry it is, if any."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "info", parents=[common], help="list named checkpoints, or describe one",
        description="Without an argument, list the named checkpoints; with one, load it and "
                    "print its\nconfiguration, parameter count and sha256 (as JSON with --json).",
        epilog="examples:\n  cryolens info\n  cryolens info demo\n"
               "  cryolens info demo --json\n  cryolens info /models/my_model.ckpt")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a name (demo, v001), an http(s) URL or a local file (default: list the "
                        "names)")
    p.add_argument("--json", action="store_true", help="print JSON (default: text)")
    p.set_defaults(run=run)


def describe(source) -> dict:
    """What ``cryolens info`` reports about one checkpoint, as a dict. ``registry`` names the
    registry entry whose weights these are (``demo``, the packaged file; ``v001``, by its
    sha256), or is None for any other weights."""
    from cryolens.checkpoints import REGISTRY, load_model

    model, info = load_model(source)
    published = REGISTRY["v001"].sha256
    registry = "v001" if info.sha256 == published else None
    if registry is None and info.display_name in REGISTRY and \
            REGISTRY[info.display_name].package_file is not None and str(source) == \
            info.display_name:
        registry = info.display_name
    return {
        "name": info.display_name,
        "sha256": info.sha256,
        "layout": info.layout,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "config": info.config.to_dict(),
        "registry": registry,
        "published_v001": info.sha256 == published,
        "v001_sha256": published,
    }


def run(args: argparse.Namespace) -> int:
    from cryolens.checkpoints import REGISTRY, list_checkpoints

    if args.checkpoint is None:
        for row in list_checkpoints():
            where = "available here" if row["available"] else "downloaded on first use"
            print(f"{row['name']:<8} {row['description']} ({where})")
        return 0
    facts = describe(args.checkpoint)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"checkpoint   {facts['name']}")
    print(f"sha256       {facts['sha256']}")
    print(f"layout       {facts['layout']}")
    print(f"parameters   {facts['parameters']:,}")
    entry = facts["registry"]
    if entry == "v001":
        print("registry     v001, the published CryoLens model (its sha256 matches)")
    elif entry is not None:
        print(f"registry     {entry}: {REGISTRY[entry].description}")
    else:
        print("registry     none: not a named checkpoint (the sha256 above identifies it)")
    print("configuration:")
    for key, value in facts["config"].items():
        print(f"  {key:<14} {value}")
    return 0
