"""Downloading a checkpoint once into the cache: within a deadline, into a part file that
becomes the cached one only once its sha256 matches and it reads as a checkpoint, with a
message that says what to do when it cannot be done.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from cryolens.errors import CheckpointError
from cryolens.statedicts import (
    first_bytes,
    infer_config,
    looks_like_checkpoint,
    read_state_dict,
    sha256_of,
)

#: Bytes read from the network at a time, at most.
_DOWNLOAD_CHUNK = 1 << 20
#: Environment variable that moves the download cache away from the per-user default.
CACHE_DIR_ENV = "CRYOLENS_CACHE_DIR"


def download(url: str, cached: Path, sha256: str | None, *, timeout: float, deadline: float,
             registry_name: str | None = None) -> tuple[str, str]:
    """The cached file, or ``url`` downloaded within ``deadline`` seconds in all into a part
    file that becomes the cached one only once its sha256 matches (when known) and it reads as
    a CryoLens checkpoint: a web page answered 200, say, is never cached. Returns the file's
    sha256 and where it came from: ``"cache"`` or ``"download"``. ``registry_name``: the
    checkpoint's name in the registry, for the message when the download fails."""
    stale = ""
    if cached.is_file():
        actual = sha256_of(cached)
        if actual == sha256 or (sha256 is None and looks_like_checkpoint(first_bytes(cached))):
            return actual, "cache"
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
        raise CheckpointError(_download_failure(url, exc, timeout, cached, sha256,
                                                registry_name) + stale) from exc
    finally:
        part.unlink(missing_ok=True)
        if part.parent.is_dir():
            part.parent.rmdir()
    return actual, "download"


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
                      sha256: str | None, registry_name: str | None) -> str:
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
    label = f"checkpoint {registry_name!r}" if registry_name else "the checkpoint"
    # URL downloads live in a sub-folder of the cache; name the file as it sits under the root.
    under_root = cached.name if registry_name else f"{cached.parent.name}/{cached.name}"
    return (
        f"{what}. To use {label} without this download: pass a local path to the file, or "
        f"pre-fill the cache by copying it to {cached}{pinned}, or set {CACHE_DIR_ENV} to a "
        f"folder that already holds {under_root}; or use `--checkpoint demo` for the small model "
        f"shipped with the package."
    )
