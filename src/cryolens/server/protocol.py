"""uvicorn's HTTP protocol with a header deadline and a header size limit.

uvicorn times out idle keep-alive connections, but not a connection that never sends a request,
nor one that dribbles its headers a byte at a time (each byte cancels the keep-alive timer): on
a shared node such clients would hold sockets, and ``limit_concurrency`` slots, forever. Here a
connection must complete its request headers within ``header_timeout_s`` of opening, or of its
previous response; otherwise it is closed without an answer. Nor does uvicorn's httptools
protocol bound the headers' size (its ``h11_max_incomplete_event_size`` is h11's alone): here a
request line and headers over ``max_header_bytes`` get 431 and the connection is closed. Body
stalls are the ASGI layer's (``BodyLimitMiddleware``: 408).

:func:`configured` gives the class with both limits set, for a server in this process. With
``--workers N`` uvicorn imports the class by name (:data:`IMPORT_STRING`) in each child, which
then reads the limits from ``CRYOLENS_HEADER_TIMEOUT_S`` and ``CRYOLENS_MAX_HEADER_BYTES``.
"""
from __future__ import annotations

import asyncio
import logging
import os

import orjson

try:  # what uvicorn's "auto" would pick
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover - httptools not installed
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base

logger = logging.getLogger("cryolens.server")
IMPORT_STRING = "cryolens.server.protocol:HeaderTimeoutProtocol"


def _from_env(name: str, default: float, kind: type) -> float:
    from cryolens.server.settings import ENV_PREFIX

    raw = os.environ.get(ENV_PREFIX + name)
    return kind(raw) if raw else default


def configured(header_timeout_s: float, max_header_bytes: int) -> type[HeaderTimeoutProtocol]:
    """The protocol class with these limits (uvicorn takes a class as well as a name)."""
    return type("ConfiguredHeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout_s": float(header_timeout_s),
                 "max_header_bytes": int(max_header_bytes)})


class HeaderTimeoutProtocol(_Base):
    """Closes a connection whose request headers are not complete in time, and answers 431
    to one whose request line and headers outgrow the limit."""

    # None: read from the environment on the first connection (a --workers child, after the
    # CLI has exported its settings)
    header_timeout_s: float | None = None
    max_header_bytes: int | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        waiting = self._header_timer is not None  # for the headers of a request
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._disarm()  # headers are in: a request is running
        elif waiting and not self.transport.is_closing():
            # every byte so far went to headers that are still incomplete
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        cls = type(self)
        if cls.header_timeout_s is None:
            from cryolens.server.settings import DEFAULT_HEADER_TIMEOUT_S

            cls.header_timeout_s = _from_env("HEADER_TIMEOUT_S", DEFAULT_HEADER_TIMEOUT_S, float)
        if cls.max_header_bytes is None:
            from cryolens.server.settings import DEFAULT_MAX_HEADER_BYTES

            cls.max_header_bytes = _from_env("MAX_HEADER_BYTES", DEFAULT_MAX_HEADER_BYTES, int)
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return
        if not self.transport.is_closing():
            logger.debug("no complete request headers in %g s: connection closed",
                         self.header_timeout_s)
            self.transport.close()

    def _refuse_headers(self) -> None:
        self._disarm()
        logger.info("request headers over %d bytes: answered 431 and closed",
                    self.max_header_bytes)
        body = orjson.dumps({
            "detail": f"the request line and headers are larger than the limit of "
                      f"{self.max_header_bytes} bytes", "field": "headers"})
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: application/json\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()
