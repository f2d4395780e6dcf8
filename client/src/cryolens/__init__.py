"""CryoLens: fast, batch-native inference for the CryoLens cryo-ET particle VAE.

Two distributions fill this one package. ``cryolens-client`` (``client/src/cryolens/``) holds
what needs no PyTorch: the HTTP client, particle formats and readers, the embeddings tables and
the ``cryolens`` console. ``cryolens-server`` (``src/cryolens/``) adds the engine, the models,
the checkpoints and the REST server; its entry point is :class:`cryolens.engine.Engine` (numpy
in, numpy out). The package's path below takes in the other one's modules wherever both are
importable: one ``site-packages/cryolens/`` when both wheels are installed, or two folders of a
checkout installed in editable mode (docs/architecture.md).
"""
from __future__ import annotations

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
