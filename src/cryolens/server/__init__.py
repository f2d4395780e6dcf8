"""The CryoLens REST server: ``create_app(settings)`` and the settings it reads.

Run it with ``cryolens-server`` / ``python -m cryolens.server.minimal_cryolens_server`` or
``uvicorn cryolens.server.minimal_cryolens_server:app``.
"""
from __future__ import annotations

from cryolens.server.app import create_app
from cryolens.server.settings import Settings

__all__ = ["Settings", "create_app"]
