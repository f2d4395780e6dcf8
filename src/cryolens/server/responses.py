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
    """True when ``Accept`` names ``application/x-npz`` (JSON stays the default, also for
    ``*/*``)."""
    accept = request.headers.get("accept", "")
    return any(part.split(";", 1)[0].strip().lower() == formats.NPZ_MEDIA_TYPE
               for part in accept.split(","))
