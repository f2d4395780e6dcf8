"""HTTP responses: JSON written by orjson (the default, the seed's format) or ``.npz`` when the
client sends ``Accept: application/x-npz``."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from cryolens import formats
from cryolens.server import codecs


class ORJSONResponse(JSONResponse):
    """JSON written by orjson; numpy arrays are serialised natively (float32 stays float32).
    Pre-rendered ``bytes`` pass through untouched."""

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):
            return content
        return codecs.dumps(content)


#: An ``.npz`` smaller than this is sent in one piece (each piece is a socket write).
ONE_PIECE_BYTES = 1024**2


class NPZResponse(Response):
    """An ``.npz`` answer sent as the pieces :func:`cryolens.formats.npz_parts` made: a large
    one goes to the socket from the arrays themselves, never copied into one body."""

    media_type = formats.NPZ_MEDIA_TYPE

    def __init__(self, parts: list[bytes | memoryview]) -> None:
        size = sum(len(p) for p in parts)
        self.parts = parts if size >= ONE_PIECE_BYTES else [b"".join(parts)]
        super().__init__(headers={"content-length": str(size)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        for part in self.parts[:-1]:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": self.parts[-1]})


def wants_npz(request: Request) -> bool:
    """True when ``Accept`` names ``application/x-npz`` (JSON stays the default, also for
    ``*/*``)."""
    accept = request.headers.get("accept", "")
    return any(part.split(";", 1)[0].strip().lower() == formats.NPZ_MEDIA_TYPE
               for part in accept.split(","))
