"""Named, local and downloaded CryoLens checkpoints: find the file, check its sha256, load it safely.

Never executes a pickle; infers the architecture from the weights alone, never from the file name.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch

from cryolens.errors import CheckpointError, DeviceError, UnsafeCheckpointError
from cryolens.model.config import ENCODER_CHANNELS, CryoLensConfig
from cryolens.model.vae import CryoLensVAE

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
#: Bytes read from the network at a time, at most.
_DOWNLOAD_CHUNK = 1 << 20
#: Environment variable that moves the download cache away from the per-user default.
CACHE_DIR_ENV = "CRYOLENS_CACHE_DIR"
#: Key prefixes added by Lightning (``model.``), DDP (``module.``) and torch.compile (``_orig_mod.``).
STRIPPED_PREFIXES: tuple[str, ...] = ("model.", "module.", "_orig_mod.")
#: State-dict entries that are the renderer's grid, rebuilt on load whatever their stored shape.
IGNORED_KEY_PART = "coords"
#: How many offending keys an error message lists before giving the count only.
_KEYS_SHOWN = 5


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
    ``"package"``, ``"cache"`` (already downloaded), ``"download"`` (fetched just now) or ``"path"``.
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


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """The cached file, or ``url`` downloaded within ``deadline`` seconds in all into a part
    file that becomes the cached one only once its sha256 matches (when known) and it reads as
    a CryoLens checkpoint: a web page answered 200, say, is never cached."""
    stale = ""
    if cached.is_file():
        actual = sha256_of(cached)
        if actual == sha256 or (sha256 is None and _looks_like_checkpoint(_head(cached))):
            return ResolvedCheckpoint(path=cached, name=name, sha256=actual, source=source,
                                      origin="cache")
        stale = f" (the cached copy at {cached} has the wrong sha256 {actual})" if sha256 else \
            f" (the cached copy at {cached} is not a checkpoint)"

    import requests
    import urllib3

    started = time.monotonic()
    # a folder of its own, so the part file has the file's name (in messages too)
    part = cached.parent / f".part-{os.getpid()}-{threading.get_ident()}" / cached.name
    try:
        _lookup_host(url, timeout)
        # A blackholed network eats the connect timeout, so give it only what the lookup left.
        connect = max(timeout - (time.monotonic() - started), 0.1)
        actual = _stream(url, part, (connect, timeout), started + deadline)
        if sha256 is not None and actual != sha256:
            raise _HashMismatch(actual)
        infer_config(read_state_dict(part)[0])
        os.replace(part, cached)
    except CheckpointError as exc:
        raise type(exc)(f"Downloaded {url}, but {_lower_first(str(exc))}; it was not cached"
                        ) from exc
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError
            ) as exc:
        raise CheckpointError(_download_failure(url, exc, timeout, cached, sha256, spec) + stale
                              ) from exc
    finally:
        part.unlink(missing_ok=True)
        if part.parent.is_dir():
            part.parent.rmdir()
    return ResolvedCheckpoint(path=cached, name=name, sha256=actual, source=source,
                              origin="download")


class _HashMismatch(ValueError):
    """The downloaded bytes hash to ``args[0]``, not the expected sha256."""


class _DeadlinePassed(TimeoutError):
    """A download still unfinished at its deadline (``args[0]``: bytes received by then)."""


def _stream(url: str, part: Path, timeout: tuple[float, float], deadline_at: float) -> str:
    """GET ``url`` into the file ``part``; its sha256. Each read returns whatever has arrived
    (``read1``), so a server that sends a byte a second still meets the deadline, checked
    between reads (one read waits at most ``timeout[1]``)."""
    import requests

    digest = hashlib.sha256()
    received = 0
    headers = {"Accept-Encoding": "identity"}  # the file's own bytes, hashed as they come
    with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
        response.raise_for_status()
        part.parent.mkdir(parents=True, exist_ok=True)
        # urllib3 < 2.1 has no read1: its read waits for a whole chunk (or the read timeout)
        read = getattr(response.raw, "read1", None) or response.raw.read
        with open(part, "wb") as out:
            while True:
                if time.monotonic() > deadline_at:
                    raise _DeadlinePassed(received)
                chunk = read(_DOWNLOAD_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
    return digest.hexdigest()


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _lookup_host(url: str, timeout: float) -> None:
    """Resolve the URL's host within ``timeout``: requests' own timeouts do not cover DNS, and an
    offline resolver can otherwise stall for tens of seconds."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            default_port = 80 if parts.scheme.lower() == "http" else 443
            socket.getaddrinfo(host, parts.port or default_port, type=socket.SOCK_STREAM)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=lookup, name="cryolens-dns", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise TimeoutError(f"looking up host {host!r} took longer than {timeout:g} s")
    if outcome[0] is not None:
        raise OSError(f"cannot resolve host {host!r} ({outcome[0]})")


def _download_failure(url: str, exc: BaseException, timeout: float, cached: Path,
                      sha256: str | None, spec: CheckpointSpec | None) -> str:
    """One paragraph: what happened, then what to do about it."""
    import requests

    if isinstance(exc, _HashMismatch):
        what = (f"Downloaded {url} but its sha256 does not match the expected {sha256} (it "
                f"is {exc.args[0]}); the file was discarded")
    else:
        if isinstance(exc, _DeadlinePassed):
            reason = (f"the download was not finished by its deadline ({exc.args[0]} bytes "
                      "received)")
        elif isinstance(exc, requests.HTTPError) and exc.response is not None:
            reason = f"HTTP {exc.response.status_code} {exc.response.reason or ''}".strip()
        elif isinstance(exc, requests.ConnectTimeout | TimeoutError):
            reason = f"no connection within {timeout:g} s"
        elif isinstance(exc, requests.Timeout):
            reason = f"the server did not answer within {timeout:g} s"
        else:
            found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(exc))
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            reason = found.group(0) if found else first_line
        what = f"Could not download {url}: {reason}"
    pinned = f" (sha256 {sha256})" if sha256 else ""
    label = f"checkpoint {spec.name!r}" if spec else "the checkpoint"
    # URL downloads live in a sub-folder of the cache; name the file as it sits under the root.
    under_root = cached.name if spec else f"{cached.parent.name}/{cached.name}"
    return (
        f"{what}. To use {label} without this download: pass a local path to the file, or "
        f"pre-fill the cache by copying it to {cached}{pinned}, or set {CACHE_DIR_ENV} to a "
        f"folder that already holds {under_root}; or use `--checkpoint demo` for the small model "
        f"shipped with the package."
    )


# -- reading ---------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Load a checkpoint file's weights without running any code from it.

    Accepts safetensors and ``torch.save`` files loadable with ``weights_only=True`` holding a raw
    state dict, a Lightning checkpoint (``state_dict``) or ``{'model_state_dict': ...}``; the format
    is read from the bytes, not the file name. Returns the state dict with ``model.``,
    ``module.`` and ``_orig_mod.`` prefixes stripped and the renderer's ``coords`` buffer dropped,
    and the layout: ``"state_dict"``, ``"lightning"``, ``"model_state_dict"`` or ``"safetensors"``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointError(f"Cannot read checkpoint {path.name}: {exc}") from exc

    if not _looks_like_checkpoint(head):
        raise CheckpointError(f"{path.name} is not a checkpoint: {_what_it_is(head)}, not "
                              "safetensors or a PyTorch file")
    if _looks_like_safetensors(head):
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path.name} is not a readable safetensors file: {exc}") from exc
        layout = "safetensors"
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # only a pickle that names a global (a function or class to call) would run code;
            # any other refusal is of bytes that are no pickle torch wrote (an odd opcode)
            if "weights only" not in str(exc).lower() or "GLOBAL" not in str(exc):
                raise CheckpointError(f"{path.name} is not a checkpoint: a damaged or foreign "
                                      "PyTorch pickle that torch.load cannot read") from exc
            wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
            asks = f" (it asks for {wanted.group(1)})" if wanted else ""
            raise UnsafeCheckpointError(
                f"Refusing to load {path.name}: it contains Python objects that would run code "
                f"when loaded{asks}, and CryoLens never loads such files. Re-save it as a plain "
                "state dict (torch.save(model.state_dict(), path)) or as safetensors, on a machine "
                "where you trust the file."
            ) from exc
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise CheckpointError(
                f"{path.name} is not a readable PyTorch checkpoint ({type(exc).__name__}: {first})"
            ) from exc
        layout, raw = _unwrap(raw, path.name)
    return _clean(raw, path.name), layout


def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(16)


def _looks_like_checkpoint(head: bytes) -> bool:
    """Could a file starting with ``head`` be a checkpoint: safetensors, a zip (``torch.save``
    since PyTorch 1.6) or a pickle of protocol 2 or later (``torch.save``'s legacy format)?"""
    return _looks_like_safetensors(head) or head.startswith((b"PK\x03\x04", b"\x80"))


def _what_it_is(head: bytes) -> str:
    """What a file that is no checkpoint looks like, from its first bytes."""
    if not head:
        return "the file is empty"
    if head.lstrip()[:1] == b"<":
        return "it looks like an HTML or XML page (a web page served instead of the file?)"
    return f"it starts with the bytes {head[:8].hex(' ')}"


def _looks_like_safetensors(head: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then the JSON header.
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _unwrap(obj: Any, label: str) -> tuple[str, Any]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{label} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("state_dict"), Mapping):
        return "lightning", obj["state_dict"]
    if isinstance(obj.get("model_state_dict"), Mapping):
        return "model_state_dict", obj["model_state_dict"]
    return "state_dict", obj


def _clean(raw: Mapping[str, Any], label: str) -> dict[str, torch.Tensor]:
    cleaned: dict[str, torch.Tensor] = {}
    not_tensors = []
    for key, value in raw.items():
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in STRIPPED_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        if IGNORED_KEY_PART in name.lower():
            continue
        if not isinstance(value, torch.Tensor):
            not_tensors.append(str(key))
            continue
        if name in cleaned:
            raise CheckpointError(f"{label} holds {name!r} twice (under different prefixes)")
        cleaned[name] = value
    if not_tensors:
        raise CheckpointError(f"{label}: entries that are not tensors: {_some(not_tensors)}")
    return cleaned


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    more = f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else ""
    return f"{shown}{more} ({len(keys)} in all)"


# -- architecture ----------------------------------------------------------------------------------
def infer_config(state_dict: Mapping[str, torch.Tensor]) -> CryoLensConfig:
    """The model's sizes, read from the weights' shapes alone (spec.md b)."""
    needed = ["mu.bias", "mu.weight", "pose.weight", "decoder.affinity_weights.2.bias",
              "decoder.affinity_centroids.0.weight"]
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise CheckpointError(
            f"Not a CryoLens checkpoint: missing {_some(missing)}; found "
            f"{_some(sorted(state_dict)) if state_dict else 'no weights'}"
        )
    latent_dims = state_dict["mu.bias"].shape[0]
    affinity_dims = state_dict["decoder.affinity_centroids.0.weight"].shape[1]
    n_affinity = state_dict["decoder.affinity_weights.2.bias"].shape[0]
    free_bias = state_dict.get("decoder.free_weights.2.bias")
    n_free = 0 if free_bias is None else free_bias.shape[0]
    free_centroids = state_dict.get("decoder.free_centroids.0.weight")
    if free_centroids is not None and free_centroids.shape[1] != latent_dims - affinity_dims:
        raise CheckpointError(
            f"Inconsistent checkpoint: the free segment reads {free_centroids.shape[1]} latent "
            f"dims but mu has {latent_dims} and the affinity segment {affinity_dims}"
        )
    flat = state_dict["mu.weight"].shape[1]
    per_side = round((flat / ENCODER_CHANNELS[-1]) ** (1 / 3))
    if ENCODER_CHANNELS[-1] * per_side**3 != flat:
        raise CheckpointError(
            f"mu.weight reads {flat} encoder features, which is not {ENCODER_CHANNELS[-1]}·k³ "
            "for any box size"
        )
    try:
        return CryoLensConfig(
            box_size=16 * per_side, latent_dims=latent_dims, affinity_dims=affinity_dims,
            n_affinity=n_affinity, n_free=n_free, pose_dims=state_dict["pose.weight"].shape[0],
        )
    except ValueError as exc:
        raise CheckpointError(f"The weights describe an unsupported model: {exc}") from exc


# -- loading ---------------------------------------------------------------------------------------
def load_model(
    source: str | os.PathLike | ResolvedCheckpoint,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[CryoLensVAE, LoadedCheckpoint]:
    """Resolve, read, check and load a checkpoint into an eval-mode :class:`CryoLensVAE`.

    ``source`` is anything :func:`resolve_checkpoint` takes, or what it returned. Every weight must match by name and shape (the ``coords`` buffer aside): anything missing,
    unexpected or mis-shaped raises :class:`CheckpointError` naming the keys.
    """
    target = _device(device)
    if isinstance(source, ResolvedCheckpoint):
        resolved = source
    else:
        resolved = resolve_checkpoint(source, cache_dir=cache_dir, timeout=timeout)
    state_dict, layout = read_state_dict(resolved.path)
    config = infer_config(state_dict)
    model = CryoLensVAE(config)
    _check_keys(model, state_dict, resolved.name)
    model.load_state_dict(state_dict, strict=True)
    model.eval().to(target)
    return model, LoadedCheckpoint(name=resolved.name, source=resolved.source,
                                   path=resolved.path, sha256=resolved.sha256, layout=layout,
                                   config=config, origin=resolved.origin)


def _check_keys(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], label: str
                ) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()
                if IGNORED_KEY_PART not in k.lower()}
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [f"{k} {tuple(state_dict[k].shape)} != {tuple(shape)}"
                  for k, shape in expected.items()
                  if k in state_dict and state_dict[k].shape != shape]
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if mis_shaped:
        problems.append(f"wrong shape {_some(mis_shaped)}")
    if problems:
        raise CheckpointError(f"Checkpoint {label} does not fit the model it describes: "
                              + "; ".join(problems))


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
