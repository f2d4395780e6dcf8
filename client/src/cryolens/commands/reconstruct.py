"""``cryolens reconstruct SOURCE... -o out.mrc``: each particle's reconstruction as MRC, with
its input's voxel size and origin (for a box cut from a tomogram, the box's corner), so it
overlays the input in any viewer. Many particles go to a folder, one file each.

A folder gets ``index.csv`` too: a row per reconstruction written there, naming its file (and
its parts' files) and where its particle came from (the columns of
:class:`cryolens.io.ParticleRecord`). Rows of files that an earlier run wrote into the same
folder are kept, so the index lists every reconstruction the folder holds. Every file to write is
checked before any work: one that exists is an error unless ``--overwrite``."""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

from cryolens.commands._common import (
    SOURCES_HELP,
    add_engine_options,
    add_input_options,
    add_progress_option,
    load_engine,
    open_from_args,
    skipped_note,
)
from cryolens.errors import InputError
from cryolens.io import MODEL_VOXEL_SIZE, RECORD_COLUMNS, ParticleRecord

MRC_OUT = (".mrc", ".map")
INDEX = "index.csv"
PARTS = ("affinity", "free")


EXAMPLES = """examples:
  cryolens reconstruct particles/particle_000.mrc -o particle_000_rec.mrc
  cryolens reconstruct particles/ -o reconstructions/ --pose predicted --segments
  cryolens reconstruct stack.mrcs -o reconstructions/ --fit --rescale"""


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "reconstruct", parents=[common], description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
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
                   help="replace existing files (default: off, an existing file is an error, "
                        "found before any work)")
    add_progress_option(p)
    p.set_defaults(run=run)


def output_voxel_size(record: ParticleRecord) -> float:
    """The reconstruction's voxel size: the input's, unless it was resampled to the model's."""
    if record.rescaled or record.voxel_size is None:
        return MODEL_VOXEL_SIZE
    return record.voxel_size


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cryolens.formats import write_mrc
    from cryolens.operations import Operation
    from cryolens.operations import run as run_operation

    engine = load_engine(args)
    particles = open_from_args(args, box=engine.config.box_size)
    out = Path(args.output)
    single = out.suffix.lower() in MRC_OUT
    names = [out] if single else folder_names(out, particles.records)
    files = [output_files(base, args.segments) for base in names]
    try:
        if single and len(particles) != 1:
            raise InputError(f"{len(particles)} particles do not fit in one file {out}: give "
                             "a folder as -o", field="output")
        if not args.overwrite:
            refuse_existing([path for paths in files for path in paths.values()])
    except InputError:
        particles.close()
        raise
    (out.parent if single else out).mkdir(parents=True, exist_ok=True)  # missing folders too
    operation = Operation(kind="reconstruct", use_predicted_pose=args.pose == "predicted",
                          segments=args.segments)
    rows: list[dict] = []
    bar = tqdm(total=len(particles), unit="particle", desc="reconstruct", file=sys.stderr,
               disable=args.quiet)
    try:
        for batch in particles.batches(args.batch_size):
            result = run_operation(engine, operation, batch.particles).arrays
            for i, record in enumerate(batch.records):
                paths = files[len(rows)]
                for key, path in paths.items():
                    write_mrc(path, result[key][i], voxel_size=output_voxel_size(record),
                              origin=(record.origin_x, record.origin_y, record.origin_z))
                rows.append(index_row(paths, record))
            bar.update(len(batch))
    finally:
        bar.close()
        particles.close()
        if rows and not single:  # what was written, even when a later batch failed
            write_index(out / INDEX, rows)
    noun = "particle" if len(particles) == 1 else "particles"
    where = out if single else f"{out} (listed in {out / INDEX})"
    written = sum(len(paths) for paths in files)
    print(f"reconstructed {len(particles)} {noun} ({args.pose} pose);"
          f"{skipped_note(particles)} wrote {written} MRC files to {where}", file=sys.stdout)
    return 0


def folder_names(folder: Path, records: list[ParticleRecord]) -> list[Path]:
    """A file per particle in ``folder``, named by its label (``-2``, ``-3``... when the same
    label comes again, as when a file is given twice)."""
    used: set[str] = set()
    return [folder / f"{_unique(record.label, used)}.mrc" for record in records]


def output_files(base: Path, segments: bool) -> dict[str, Path]:
    """The files of one particle, by the operation's array they hold."""
    files = {"reconstruction": base}
    if segments:
        for part in PARTS:
            files[f"{part}_reconstruction"] = base.with_name(f"{base.stem}_{part}{base.suffix}")
    return files


def refuse_existing(paths: list[Path]) -> None:
    existing = [path for path in paths if path.exists()]
    if existing:
        also = (f" (and {len(existing) - 1} more of the {len(paths)} files to write)"
                if len(existing) > 1 else "")
        raise InputError(f"{existing[0]} exists{also}; use --overwrite to replace it, or "
                         "another -o", field="output")


def index_row(paths: dict[str, Path], record: ParticleRecord) -> dict:
    row = {"file": paths["reconstruction"].name}
    for part in PARTS:
        path = paths.get(f"{part}_reconstruction")
        row[f"{part}_file"] = path.name if path is not None else ""
    return {**row, **record.as_row()}


def write_index(path: Path, rows: list[dict]) -> None:
    """``rows`` into the folder's index, in the order written: the rows of an earlier run
    first, a file written again keeping its place with its new row; written whole, then renamed
    into place."""
    kept: dict[str, dict] = {}
    if path.exists():
        with path.open(newline="") as f:
            kept = {row["file"]: row for row in csv.DictReader(f) if row.get("file")}
    for row in rows:
        kept[row["file"]] = {key: "" if value is None else value for key, value in row.items()}
    columns = ["file", *(f"{part}_file" for part in PARTS), *RECORD_COLUMNS]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(kept.values())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text.getvalue(), newline="")
    os.replace(tmp, path)


def _unique(name: str, used: set[str]) -> str:
    candidate, k = name, 1
    while candidate in used:
        k += 1
        candidate = f"{name}-{k}"
    used.add(candidate)
    return candidate
