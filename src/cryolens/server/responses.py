"""HTTP responses: JSON written by orjson (the default, the seed's format) or ``.npz`` when the
client sends ``Accept: application/x-npz``."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
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


#: An answer sent from its pieces goes out in messages of about this many bytes.
MESSAGE_BYTES = 1 << 20


class PiecesResponse(Response):
    """An answer sent from the pieces whose concatenation it is (JSON rows, or an ``.npz``'s
    records with views of the arrays), never joined whole: beyond the result it costs its
    pieces and one message of about :data:`MESSAGE_BYTES`. Each message's body is bytes, as
    ASGI wants (Ray Serve pickles every message; a view of the arrays would not survive that);
    ``Content-Length`` is the pieces' sum."""

    def __init__(self, pieces: Sequence[bytes | memoryview], media_type: str,
                 status_code: int = 200) -> None:
        self.pieces = [memoryview(piece).cast("B") for piece in pieces]
        length = sum(len(piece) for piece in self.pieces)
        super().__init__(None, status_code, {"content-length": str(length)}, media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        for body in messages(self.pieces, MESSAGE_BYTES):
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def messages(pieces: Sequence[memoryview], size: int) -> Iterator[bytes]:
    """The concatenation of ``pieces`` (byte views) as bytes of ``size`` each (the last one
    shorter)."""
    buffer = bytearray()
    for piece in pieces:
        start = 0
        while start < len(piece):
            take = min(size - len(buffer), len(piece) - start)
            buffer += piece[start:start + take]
            start += take
            if len(buffer) == size:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


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
