"""uvicorn's HTTP protocol with a header deadline, a header size limit and a send deadline.

uvicorn times out idle keep-alive connections, but not a connection that never sends a request,
nor one that dribbles its headers a byte at a time (each byte cancels the keep-alive timer): on
a shared node such clients would hold sockets, and ``limit_concurrency`` slots, forever. Here a
connection must complete its request headers within ``header_timeout_s`` of opening, or of its
previous response; otherwise it is closed without an answer.

Nor does uvicorn's httptools protocol bound the headers' size (its
``h11_max_incomplete_event_size`` is h11's alone, and h11 too only bounds headers still
incomplete): here a request line and headers over ``max_header_bytes`` get 431 and the
connection is closed, however the bytes arrive. Incomplete headers are counted as raw bytes
(so a dribble cannot grow the parser's buffer); complete ones as the parser reads them (request
target, each field's name and value with their separators), so headers sent in one write are
held to the same limit.

And an answer the client does not read would stay in memory as long as the socket stays open:
while the transport's buffer is full, the client must take at least ``min_send_rate`` bytes per
second of it over every ``send_timeout_s`` (any progress at all when the rate is 0), or the
connection is aborted and the answer freed (nginx's ``send_timeout``, with a minimum rate).
Body stalls are the ASGI layer's (``BodyLimitMiddleware``: 408).

:func:`configured` gives the class with its limits set, for a server in this process. With
``--workers N`` uvicorn imports the class by name (:data:`IMPORT_STRING`) in each child, which
then reads the limits from ``CRYOLENS_HEADER_TIMEOUT_S``, ``CRYOLENS_MAX_HEADER_BYTES``,
``CRYOLENS_SEND_TIMEOUT_S`` and ``CRYOLENS_MIN_SEND_RATE``.

This subclasses uvicorn's httptools protocol and overrides some of its methods (the parser
callbacks, ``send_400_response``, ``pause_writing``/``resume_writing``): ``pyproject.toml``
bounds uvicorn to the versions it was tested with.
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


def configured(header_timeout_s: float, max_header_bytes: int, send_timeout_s: float,
               min_send_rate: int) -> type[HeaderTimeoutProtocol]:
    """The protocol class with these limits (uvicorn takes a class as well as a name)."""
    return type("ConfiguredHeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout_s": float(header_timeout_s),
                 "max_header_bytes": int(max_header_bytes),
                 "send_timeout_s": float(send_timeout_s),
                 "min_send_rate": int(min_send_rate)})


class _HeadersTooLarge(Exception):
    """Raised from a parser callback to stop parsing; answered 431 (``send_400_response``)."""


#: Bytes a parsed header field adds beyond its name and value (": " and CRLF).
_FIELD_OVERHEAD = 4
#: Bytes of a request line beyond its target, counted once ("POST ", " HTTP/1.1", CRLF).
_LINE_OVERHEAD = 16


class HeaderTimeoutProtocol(_Base):
    """Closes a connection whose request headers are not complete in time, answers 431 to one
    whose request line and headers outgrow the limit, and aborts one that does not read its
    answer."""

    # None: read from the environment on the first connection (a --workers child, after the
    # CLI has exported its settings)
    header_timeout_s: float | None = None
    max_header_bytes: int | None = None
    send_timeout_s: float | None = None
    min_send_rate: int | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # raw bytes of headers still incomplete
        self._head_bytes = 0  # parsed bytes of the current request's line and headers
        self._too_large = False
        self._load_limits()
        super().connection_made(transport)
        self._arm()

    # -- header size, as the parser reads them ------------------------------------------------
    def on_message_begin(self) -> None:
        self._head_bytes = _LINE_OVERHEAD
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + _FIELD_OVERHEAD)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            self._too_large = True
            raise _HeadersTooLarge  # uvicorn turns a failed callback into send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._refuse_headers()
        else:
            super().send_400_response(msg)

    # -- answers the client does not read -----------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_send(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        self._stop_send_watch()
        super().resume_writing()

    def _watch_send(self, buffered: int) -> None:
        self._stop_send_watch()
        self._send_timer = self.loop.call_later(self.send_timeout_s, self._check_send, buffered)

    def _stop_send_watch(self) -> None:
        timer = getattr(self, "_send_timer", None)
        if timer is not None:
            timer.cancel()
            self._send_timer = None

    def _check_send(self, buffered_before: int) -> None:
        """A send window ended with writing still paused: the client must have taken its
        quota of the buffered answer meanwhile (nothing is added to it while paused)."""
        self._send_timer = None
        if self.transport.is_closing():
            return
        buffered = self.transport.get_write_buffer_size()
        taken = max(0, buffered_before - buffered)
        if taken < max(1, self.min_send_rate * self.send_timeout_s):
            logger.info("answer not read: %d bytes taken in %g s (minimum %d bytes/s), %d "
                        "bytes unsent: connection closed", taken, self.send_timeout_s,
                        self.min_send_rate, buffered)
            self.transport.abort()  # drops the buffer; uvicorn sees the connection lost
            return
        self._watch_send(buffered)

    def data_received(self, data: bytes) -> None:
        waiting = self._header_timer is not None  # for the headers of a request
        # The body of a request answered before it was read (a 422 on a query option) may go
        # on arriving: those bytes are its own, not the next request's headers. (A chunk that
        # ends it and begins the next request goes uncounted here; the parsed count still holds
        # complete headers to the limit, and a chunk is at most the transport's read size.)
        in_body = self.cycle is not None and self.cycle.more_body
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._disarm()  # headers are in: a request is running
        elif waiting and not in_body and not self.transport.is_closing():
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
        self._stop_send_watch()
        super().connection_lost(exc)

    @classmethod
    def _load_limits(cls) -> None:
        """Limits not set by :func:`configured`: from ``CRYOLENS_*``, else the defaults."""
        if cls.send_timeout_s is not None:
            return
        from cryolens.server import settings

        cls.header_timeout_s = _from_env("HEADER_TIMEOUT_S", settings.DEFAULT_HEADER_TIMEOUT_S,
                                         float)
        cls.max_header_bytes = _from_env("MAX_HEADER_BYTES", settings.DEFAULT_MAX_HEADER_BYTES,
                                         int)
        cls.min_send_rate = _from_env("MIN_SEND_RATE", settings.DEFAULT_MIN_SEND_RATE, int)
        cls.send_timeout_s = _from_env("SEND_TIMEOUT_S", settings.DEFAULT_SEND_TIMEOUT_S,
                                       float)

    def _arm(self) -> None:
        self._disarm()
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
