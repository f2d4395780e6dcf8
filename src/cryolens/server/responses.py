"""HTTP responses: JSON written by orjson (the default, the seed's format) or ``.npz`` when the
client sends ``Accept: application/x-npz``."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cryolens import formats
from cryolens.server import codecs


class ORJSONResponse(JSONResponse):
    """JSON written by orjson; numpy arrays are serialised natively (float32 stays float32).
    Pre-rendered ``bytes`` pass through untouched."""

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):
            return content
        return codecs.dumps(content)


class NPZResponse(Response):
    """An ``.npz`` answer (bytes, as ASGI wants: Ray Serve pickles each message, and a view
    of the arrays would not survive that)."""

    media_type = formats.NPZ_MEDIA_TYPE


def wants_npz(request: Request) -> bool:
    """True when ``Accept`` names ``application/x-npz`` with a quality above 0 (JSON stays the
    default, also for ``*/*``)."""
    accept = request.headers.get("accept", "")
    for part in accept.split(","):
        media, _, params = part.partition(";")
        if media.strip().lower() == formats.NPZ_MEDIA_TYPE and _quality(params) > 0:
            return True
    return False


def _quality(params: str) -> float:
    """The ``q`` of a media range's parameters (1 when absent or unreadable)."""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 1.0
    return 1.0
