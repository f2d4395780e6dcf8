"""Options every particle command shares, and turning them into a particle set or an engine."""
from __future__ import annotations

import argparse
import sys

from cryolens.cliutil import cli_wording, plural, positive_int, positive_number
from cryolens.io import (
    MODEL_BOX,
    MODEL_VOXEL_SIZE,
    CopickOptions,
    ParticleSet,
    ReadOptions,
    TableOptions,
)

SOURCES_HELP = ("particles: MRC/MRCS files (one particle each, or stacks), folders of them, "
                "HDF5 (.h5), zarr (.zarr), .npy, a copick configuration (.json, with --object; "
                "copick and zarr need pip install 'cryolens-server[io]'), or a particle table: "
                "RELION/Warp .star, Dynamo .tbl, IMOD .mod (with --tomograms; pip install "
                "'cryolens-server[tables]')")


def add_input_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reading particles")
    group.add_argument("--dataset", default=None,
                       help="HDF5/zarr: the array to read (default: the only 4-D array)")
    group.add_argument("--voxel-size", type=positive_number, default=None,
                       dest="declared_voxel_size", metavar="A",
                       help="angstrom per voxel of inputs whose header lacks it or is wrong; "
                            "it overrules the header, anisotropic ones included (default: the "
                            "header's; none in the file means the model's "
                            f"{MODEL_VOXEL_SIZE:g} A)")
    group.add_argument("--rescale", action="store_true",
                       help="resample particles whose voxel size is not the model's "
                            f"{MODEL_VOXEL_SIZE:g} A (default: off, such input is an error)")
    group.add_argument("--fit", action="store_true",
                       help=f"crop or pad boxes that are not {MODEL_BOX}^3 about their centre "
                            "(default: off, such input is an error)")
    group.add_argument("--permissive", action="store_true",
                       help="read MRC files with damaged headers (mrcfile permissive mode; "
                            "default: off, strict)")
    group.add_argument("--skip-unreadable", action="store_true",
                       help="leave out MRC files that cannot be read as particles (a damaged "
                            "header, a size that does not match it), each named in a warning "
                            "(default: off, such a file stops the command)")
    cp = parser.add_argument_group("copick projects (pip install 'cryolens-server[io]')")
    cp.add_argument("--object", default=None,
                    help="pickable object whose picks become particles (required for copick; "
                         "default: none)")
    cp.add_argument("--voxel-spacing", type=positive_number, default=MODEL_VOXEL_SIZE,
                    help="tomogram voxel spacing to use, angstrom; the nearest available one is "
                         "taken (default: %(default)s)")
    cp.add_argument("--run", action="append", default=None, dest="runs", metavar="NAME",
                    help="only this run; repeat for several (default: every run)")
    cp.add_argument("--tomo-type", default=None,
                    help="tomogram type (default: 'denoised', else 'wbp', else the first by name)")
    cp.add_argument("--user-id", default=None, help="only picks by this user (default: all)")
    cp.add_argument("--session-id", default=None, help="only picks of this session (default: all)")
    tables = parser.add_argument_group("particle tables (.star, .tbl, .mod; docs/tables.md)")
    tables.add_argument("--tomograms", default=None, metavar="DIR",
                        help="the tables' tomograms: a folder of MRC files found by the names "
                             "the table gives (rlnTomoName, an IMOD model's name), one MRC file "
                             "for every row, or for Dynamo a .doc catalogue or a folder holding "
                             "one (required for tables; default: none)")
    tables.add_argument("--coordinate-pixel-size", type=positive_number, default=None,
                        metavar="A",
                        help="angstrom per pixel of the table's coordinates (default: what a "
                             "STAR file says, e.g. rlnTomoTiltSeriesPixelSize, else the "
                             "tomogram's voxel size)")


def add_engine_options(parser: argparse.ArgumentParser, batch_size: int = 32) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", "-c", default="demo",
                       help="checkpoint: a name (demo, v001), a URL or a file "
                            "(default: %(default)s)")
    group.add_argument("--device", default="auto",
                       help="cpu, cuda, cuda:N (the N-th GPU) or auto (CUDA when available) "
                            "(default: %(default)s)")
    group.add_argument("--batch-size", type=positive_int, default=batch_size,
                       help="particles per model call (default: %(default)s)")


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (default: off, a bar on standard error)")


def read_options(args: argparse.Namespace) -> ReadOptions:
    return ReadOptions(rescale=args.rescale, fit=args.fit, permissive=args.permissive,
                       declared_voxel_size=args.declared_voxel_size, dataset=args.dataset,
                       skip_unreadable=args.skip_unreadable)


def copick_options(args: argparse.Namespace) -> CopickOptions:
    return CopickOptions(object=args.object, voxel_spacing=args.voxel_spacing,
                         runs=tuple(args.runs or ()), tomo_type=args.tomo_type,
                         user_id=args.user_id, session_id=args.session_id)


def table_options(args: argparse.Namespace) -> TableOptions:
    return TableOptions(tomograms=args.tomograms, coordinate_pixel_size=args.coordinate_pixel_size)


def open_from_args(args: argparse.Namespace, sources=None, box: int | None = None) -> ParticleSet:
    from dataclasses import replace

    from cryolens.io import open_particles

    options = read_options(args)
    if box is not None:
        options = replace(options, box=box)
    particles = open_particles(sources if sources is not None else args.sources, options,
                               copick_options(args), table_options(args))
    for warning in particles.warnings:
        print(f"warning: {cli_wording(warning)}", file=sys.stderr)
    return particles


def skipped_note(particles: ParticleSet) -> str:
    """`` N unreadable files skipped;`` for a command's last line, or nothing."""
    n = len(particles.skipped)
    return f" {plural(n, 'unreadable file')} skipped;" if n else ""


def load_engine(args: argparse.Namespace):
    from cryolens.engine import Engine

    return Engine.from_checkpoint(args.checkpoint, device=args.device)
