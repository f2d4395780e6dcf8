"""``cryolens show SOURCE... -o slices.png``: central z, y and x slices of each particle beside
its reconstruction and the reconstruction's two parts (affinity and free splats)."""
from __future__ import annotations

import argparse
from pathlib import Path

from cryolens.cliutil import positive_int
from cryolens.commands._common import (
    SOURCES_HELP,
    add_engine_options,
    add_input_options,
    load_engine,
    open_from_args,
)

COLUMNS = ("input", "reconstruction", "affinity part", "free part")


EXAMPLES = """examples:
  cryolens show particles/ -o slices.png --max-particles 3
  cryolens show copick_config.json --object ribosome -o picks.pdf"""


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "show", parents=[common], description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        help="a picture (PNG, PDF, ...) of particles beside their reconstructions")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("-o", "--output", default="slices.png",
                   help="picture to write, in the format its suffix names: .png, .pdf, "
                        ".svg, .jpg, ... (default: %(default)s)")
    p.add_argument("--max-particles", type=positive_int, default=6,
                   help="show the first this many particles (default: %(default)s)")
    p.add_argument("--pose", choices=("predicted", "identity"), default="predicted",
                   help="decode in each particle's predicted pose, which lines up with the "
                        "input, or in the canonical identity pose (default: %(default)s)")
    add_input_options(p)
    add_engine_options(p)
    p.set_defaults(run=run)


def show(engine, volumes, labels, out, *, pose: str = "predicted", title: str | None = None):
    """Write the figure for ``volumes`` (N, S, S, S); returns the operation's arrays."""
    from cryolens.operations import Operation
    from cryolens.operations import run as run_operation
    from cryolens.plots import slices_figure

    operation = Operation(kind="reconstruct", use_predicted_pose=pose == "predicted",
                          segments=True)
    arrays = run_operation(engine, operation, volumes).arrays
    rows = [[volumes[i], arrays["reconstruction"][i], arrays["affinity_reconstruction"][i],
             arrays["free_reconstruction"][i]] for i in range(len(volumes))]
    slices_figure(out, rows, COLUMNS, row_labels=labels, title=title)
    return arrays


def run(args: argparse.Namespace) -> int:
    from cryolens.plots import figure_format

    figure_format(args.output)  # a suffix matplotlib cannot write fails before any work
    engine = load_engine(args)
    particles = open_from_args(args, box=engine.config.box_size)
    try:
        batch = particles.read(particles.items[: args.max_particles])
    finally:
        particles.close()
    labels = [r.label + (" (edge)" if r.edge else "") for r in batch.records]
    name = getattr(engine.checkpoint, "display_name", "model")
    show(engine, batch.particles, labels, Path(args.output), pose=args.pose,
         title=f"{name}, {args.pose} pose; {len(batch)} of {len(particles)} particles")
    print(f"wrote {args.output}: {len(batch)} of {len(particles)} particles, central z|y|x "
          "slices of input, reconstruction, affinity and free parts")
    return 0
