"""Named, local and downloaded CryoLens checkpoints: find the file, check its sha256, load it
safely.

Never executes a pickle; infers the architecture from the weights alone, never from the file name.
Reading a file (:mod:`cryolens.statedicts`) and downloading one (:mod:`cryolens.downloads`) are
modules of their own; their public names are importable from here too.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch

from cryolens.downloads import CACHE_DIR_ENV, download
from cryolens.errors import CheckpointError, DeviceError
from cryolens.model.config import CryoLensConfig
from cryolens.model.vae import CryoLensVAE
from cryolens.statedicts import check_keys, infer_config, read_state_dict, sha256_of

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_DOWNLOAD_DEADLINE",
    "DEFAULT_TIMEOUT",
    "REGISTRY",
    "CheckpointSpec",
    "LoadedCheckpoint",
    "ResolvedCheckpoint",
    "default_cache_dir",
    "fetch",
    "infer_config",
    "list_checkpoints",
    "load_model",
    "read_state_dict",
    "resolve_checkpoint",
    "sha256_of",
]

#: Seconds a download may wait on the network (name lookup plus connect, then each read).
DEFAULT_TIMEOUT = 10.0
#: Seconds a whole download may take, however slowly its bytes come (v001 at 1 MB/s: ~3 min).
DEFAULT_DOWNLOAD_DEADLINE = 900.0


@dataclass(frozen=True)
class CheckpointSpec:
    """A named checkpoint: where its file comes from and what its bytes must hash to.

    Exactly one of ``url`` (downloaded once into the user cache) or ``package_file`` (a file under
    ``cryolens/data/`` shipped with the package) says where the file comes from.
    """

    name: str
    description: str
    filename: str
    url: str | None = None
    sha256: str | None = None
    package_file: str | None = None
    licence: str = "unknown"

    def __post_init__(self) -> None:
        if (self.url is None) == (self.package_file is None):
            raise ValueError(f"checkpoint {self.name!r} needs exactly one of url or package_file")


REGISTRY: dict[str, CheckpointSpec] = {
    spec.name: spec
    for spec in (
        CheckpointSpec(
            name="v001",
            description="CryoLens v001: the published model (latent 40, 614 + 154 splats, box 48)",
            filename="cryolens_v001.pt",
            url="https://czi-cryolens.s3-us-west-2.amazonaws.com/weights/cryolens_v001.pt",
            sha256="f0de0ce03580091c53a1265efb4b2b0f38c952ad1a68a4cfb0a548d9c76f790e",
            licence="as published by CZI with czi-ai/cryolens; see that project's terms",
        ),
        CheckpointSpec(
            name="demo",
            description="Small demo model trained on synthetic particles, shipped with the package",
            filename="demo.safetensors",
            package_file="demo.safetensors",
            licence="MIT (this package)",
        ),
    )
}


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint file on local disk.

    ``name`` is safe to show anyone (registry name or bare file name); ``source`` is what the caller
    asked for and may be a private path or URL; ``origin`` says how the file was obtained:
    ``"package"``, ``"cache"`` (already downloaded), ``"download"`` (fetched just now) or
    ``"path"``.
    """

    path: Path
    name: str
    sha256: str
    source: str
    origin: str = "path"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What was loaded and how. Expose :meth:`to_dict` (no paths), never ``source`` or ``path``."""

    name: str
    source: str
    path: Path
    sha256: str
    layout: str
    config: CryoLensConfig
    origin: str = "path"

    @property
    def display_name(self) -> str:
        """Registry name or bare file name: never a directory or a URL."""
        return self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.display_name, "sha256": self.sha256, "layout": self.layout,
                "config": self.config.to_dict()}


# -- resolution ------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$CRYOLENS_CACHE_DIR`` if set, else the per-user cache (e.g. ``~/.cache/cryolens``)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    import pooch

    return Path(pooch.os_cache("cryolens")).expanduser().resolve()


def list_checkpoints(cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per registry entry, for ``--list-versions``: name, description, where it comes from,
    sha256, licence and whether it is available here without a network."""
    rows = []
    for spec in REGISTRY.values():
        if spec.package_file is not None:
            available = _package_path(spec).is_file()
            where = "shipped with the package"
        else:
            available = (_cache_root(cache_dir) / spec.filename).is_file()
            where = spec.url
        rows.append({"name": spec.name, "description": spec.description, "source": where,
                     "sha256": spec.sha256, "licence": spec.licence, "available": available})
    return rows


def resolve_checkpoint(
    source: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    registry: Mapping[str, CheckpointSpec] | None = None,
    deadline: float = DEFAULT_DOWNLOAD_DEADLINE,
) -> ResolvedCheckpoint:
    """Turn a registry name, an http(s) URL or a local path into a checked file on disk.

    Named and URL checkpoints are downloaded once into ``cache_dir`` (default
    :func:`default_cache_dir`); a cached file whose sha256 matches is used without any network
    access. A URL may pin its hash as ``https://host/file.pt#sha256=<hex>``. ``timeout`` bounds
    each wait on the network, ``deadline`` a whole download (seconds).
    """
    registry = REGISTRY if registry is None else registry
    text = os.fspath(source)
    if isinstance(source, str) and text in registry:
        return fetch(registry[text], cache_dir=cache_dir, timeout=timeout, source=text,
                     deadline=deadline)
    if isinstance(source, str) and re.match(r"^https?://", text, re.IGNORECASE):
        return _fetch_url(text, cache_dir=cache_dir, timeout=timeout, deadline=deadline)
    path = Path(text).expanduser()
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        names = ", ".join(registry) or "none"
        raise CheckpointError(
            f"Checkpoint {text!r} {what}. Pass a checkpoint file (.pt, .ckpt, .safetensors), an "
            f"http(s) URL, or one of the known names: {names}."
        )
    return ResolvedCheckpoint(path=path.resolve(), name=path.name, sha256=sha256_of(path),
                              source=text, origin="path")


def fetch(
    spec: CheckpointSpec,
    *,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    source: str | None = None,
    deadline: float = DEFAULT_DOWNLOAD_DEADLINE,
) -> ResolvedCheckpoint:
    """The file for one registry entry: from the package, from the cache, or downloaded now."""
    source = spec.name if source is None else source
    if spec.package_file is not None:
        return _package_checkpoint(spec, source)
    assert spec.url is not None
    cached = _cache_root(cache_dir) / spec.filename
    return _download(spec.url, cached, spec.sha256, name=spec.name, source=source,
                     timeout=timeout, spec=spec, deadline=deadline)


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser().resolve()


def _package_path(spec: CheckpointSpec) -> Path:
    assert spec.package_file is not None
    return Path(str(resources.files("cryolens.data") / spec.package_file))


def _package_checkpoint(spec: CheckpointSpec, source: str) -> ResolvedCheckpoint:
    path = _package_path(spec)
    if not path.is_file():
        others = ", ".join(name for name in REGISTRY if name != spec.name) or "none"
        raise CheckpointError(
            f"The {spec.name} checkpoint is not in this install (expected cryolens/data/"
            f"{spec.package_file} inside the package). Install a build of cryolens that ships it, "
            f"or pass a local checkpoint path or another name ({others})."
        )
    actual = sha256_of(path)
    sidecar = path.with_name(path.name + ".sha256")
    expected = [spec.sha256] if spec.sha256 else []
    if sidecar.is_file():
        words = sidecar.read_text().split()
        if words:
            expected.append(words[0].lower())
    for want in expected:
        if actual != want:
            raise CheckpointError(
                f"The {spec.name} checkpoint shipped with this install is damaged: its sha256 is "
                f"{actual}, expected {want}. Reinstall the package."
            )
    return ResolvedCheckpoint(path=path, name=spec.name, sha256=actual, source=source,
                              origin="package")


def _fetch_url(url: str, *, cache_dir: str | os.PathLike | None, timeout: float,
               deadline: float = DEFAULT_DOWNLOAD_DEADLINE) -> ResolvedCheckpoint:
    parts = urlsplit(url)
    known = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", parts.fragment)
    bare = urlunsplit(parts._replace(fragment=""))
    name = Path(parts.path).name or "checkpoint"
    # The URL's digest keeps two different files of the same name apart in the cache.
    prefix = hashlib.sha256(bare.encode()).hexdigest()[:12]
    cached = _cache_root(cache_dir) / "urls" / f"{prefix}-{name}"
    return _download(bare, cached, known.group(1).lower() if known else None, name=name,
                     source=url, timeout=timeout, spec=None, deadline=deadline)


def _download(url: str, cached: Path, sha256: str | None, *, name: str, source: str,
              timeout: float, spec: CheckpointSpec | None,
              deadline: float = DEFAULT_DOWNLOAD_DEADLINE) -> ResolvedCheckpoint:
    """The cached file, or ``url`` downloaded now (:func:`cryolens.downloads.download`)."""
    actual, origin = download(url, cached, sha256, timeout=timeout, deadline=deadline,
                              registry_name=spec.name if spec else None)
    return ResolvedCheckpoint(path=cached, name=name, sha256=actual, source=source,
                              origin=origin)


# -- loading ---------------------------------------------------------------------------------------
def load_model(
    source: str | os.PathLike | ResolvedCheckpoint,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[CryoLensVAE, LoadedCheckpoint]:
    """Resolve, read, check and load a checkpoint into an eval-mode :class:`CryoLensVAE`.

    ``source`` is anything :func:`resolve_checkpoint` takes, or what it returned. Every weight
    must match by name and shape (the ``coords`` buffer aside): anything missing, unexpected or
    mis-shaped raises :class:`CheckpointError` naming the keys.
    """
    target = _device(device)
    if isinstance(source, ResolvedCheckpoint):
        resolved = source
    else:
        resolved = resolve_checkpoint(source, cache_dir=cache_dir, timeout=timeout)
    state_dict, layout = read_state_dict(resolved.path)
    config = infer_config(state_dict)
    model = CryoLensVAE(config)
    check_keys(model, state_dict, resolved.name)
    model.load_state_dict(state_dict, strict=True)
    model.eval().to(target)
    return model, LoadedCheckpoint(name=resolved.name, source=resolved.source,
                                   path=resolved.path, sha256=resolved.sha256, layout=layout,
                                   config=config, origin=resolved.origin)


def _device(device: str | torch.device) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"Unknown device {device!r}: {exc}") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"Device {device!r} asked for, but CUDA is not available here")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"Device {device!r} asked for, but MPS is not available here")
    return target
