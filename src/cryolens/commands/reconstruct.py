"""``cryolens reconstruct SOURCE... -o out.mrc``: each particle's reconstruction as MRC, with
its input's voxel size and origin (for a box cut from a tomogram, the box's corner), so it
overlays the input in any viewer. Many particles go to a folder, one file each."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryolens.commands._common import (
    SOURCES_HELP,
    add_engine_options,
    add_input_options,
    load_engine,
    open_from_args,
)
from cryolens.errors import InputError
from cryolens.io import MODEL_VOXEL_SIZE, ParticleRecord

MRC_OUT = (".mrc", ".map")


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "reconstruct", parents=[common], description=__doc__.split("\n\n")[0],
        help="reconstruct your particles as MRC files")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("-o", "--output", required=True,
                   help="out.mrc for one particle, or a folder (one <name>.mrc per particle) "
                        "(required)")
    p.add_argument("--pose", choices=("identity", "predicted"), default="identity",
                   help="decode in CryoLens's canonical identity pose, or in each particle's "
                        "predicted pose, which overlays the input (default: %(default)s)")
    p.add_argument("--segments", action="store_true",
                   help="also write the affinity and free splats' parts, *_affinity.mrc and "
                        "*_free.mrc (default: off)")
    add_input_options(p)
    add_engine_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files (default: off, an existing file is an error)")
    p.set_defaults(run=run)


def output_voxel_size(record: ParticleRecord) -> float:
    """The reconstruction's voxel size: the input's, unless it was resampled to the model's."""
    if record.rescaled or record.voxel_size is None:
        return MODEL_VOXEL_SIZE
    return record.voxel_size


def run(args: argparse.Namespace) -> int:
    from cryolens.formats import write_mrc
    from cryolens.operations import Operation
    from cryolens.operations import run as run_operation

    engine = load_engine(args)
    particles = open_from_args(args, box=engine.config.box_size)
    out = Path(args.output)
    single = out.suffix.lower() in MRC_OUT
    if single and len(particles) != 1:
        raise InputError(f"{len(particles)} particles do not fit in one file {out}: give a "
                         "folder as -o", field="output")
    (out.parent if single else out).mkdir(parents=True, exist_ok=True)  # missing folders too
    operation = Operation(kind="reconstruct", use_predicted_pose=args.pose == "predicted",
                          segments=args.segments)
    used: set[str] = set()
    written = 0
    try:
        for batch in particles.batches(args.batch_size):
            result = run_operation(engine, operation, batch.particles).arrays
            for i, record in enumerate(batch.records):
                base = out if single else out / f"{_unique(record.label, used)}.mrc"
                parts = {base: result["reconstruction"][i]}
                if args.segments:
                    for part in ("affinity", "free"):
                        name = base.with_name(f"{base.stem}_{part}{base.suffix}")
                        parts[name] = result[f"{part}_reconstruction"][i]
                for path, volume in parts.items():
                    if path.exists() and not args.overwrite:
                        raise InputError(f"{path} exists; use --overwrite to replace it",
                                         field="output")
                    write_mrc(path, volume, voxel_size=output_voxel_size(record),
                              origin=(record.origin_x, record.origin_y, record.origin_z))
                    written += 1
    finally:
        particles.close()
    noun = "particle" if len(particles) == 1 else "particles"
    print(f"reconstructed {len(particles)} {noun} ({args.pose} pose); wrote {written} MRC "
          f"files to {out}", file=sys.stdout)
    return 0


def _unique(name: str, used: set[str]) -> str:
    candidate, k = name, 1
    while candidate in used:
        k += 1
        candidate = f"{name}-{k}"
    used.add(candidate)
    return candidate
