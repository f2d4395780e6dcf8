"""Copy a trained checkpoint into the package as the ``demo`` model, with its sha256 sidecar.

Usage: python scripts/ship_demo.py runs/demo/final.safetensors
The weights are re-saved as plain safetensors (weights only, training metadata kept as JSON);
the sidecar ``demo.safetensors.sha256`` is what the loader and the tests check.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from cryolens.checkpoints import read_state_dict, sha256_of

DATA = Path(__file__).resolve().parents[1] / "src" / "cryolens" / "data"


def main(source: str) -> None:
    state, _ = read_state_dict(source)
    with safe_open(source, "pt") as f:
        meta = json.loads((f.metadata() or {}).get("cryolens", "{}"))
    keep = {key: meta.get(key) for key in ("step", "config", "settings")}
    target = DATA / "demo.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(target),
              metadata={"cryolens": json.dumps(keep)})
    digest = sha256_of(target)
    (DATA / "demo.safetensors.sha256").write_text(digest + "\n")
    print(f"{target} ({target.stat().st_size / 1e6:.1f} MB) sha256 {digest}")


if __name__ == "__main__":
    main(sys.argv[1])
