"""Where ../shared lives (or CRYOLENS_SHARED), and the parity checkpoint and golden arrays in
it: tests skip, saying so, where they are missing."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CRYOLENS_SHARED", REPO.parent / "shared"))
PARITY = SHARED / "parity"
PARITY_CKPT = PARITY / "v001_random_lightning.ckpt"
GOLDEN = PARITY / "golden_dev.npz"

needs_parity = pytest.mark.skipif(
    not (PARITY_CKPT.exists() and GOLDEN.exists()),
    reason=f"parity fixtures not found under {PARITY} (set CRYOLENS_SHARED to the shared/ folder)",
)
