"""uvicorn's HTTP protocol with a header deadline.

uvicorn times out idle keep-alive connections, but not a connection that never sends a request,
nor one that dribbles its headers a byte at a time (each byte cancels the keep-alive timer): on
a shared node such clients would hold sockets, and ``limit_concurrency`` slots, forever. Here a
connection must complete its request headers within ``header_timeout_s`` of opening, or of its
previous response; otherwise it is closed without an answer. Body stalls are the ASGI layer's
(``BodyLimitMiddleware``: 408).

Passed to uvicorn by import string (``http="cryolens.server.protocol:HeaderTimeoutProtocol"``),
so ``--workers N`` children import it too; the deadline comes from ``CRYOLENS_HEADER_TIMEOUT_S``.
"""
from __future__ import annotations

import asyncio
import logging
import os

try:  # what uvicorn's "auto" would pick
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover - httptools not installed
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base

logger = logging.getLogger("cryolens.server")
IMPORT_STRING = "cryolens.server.protocol:HeaderTimeoutProtocol"


def header_timeout_s() -> float:
    from cryolens.server.settings import DEFAULT_HEADER_TIMEOUT_S, ENV_PREFIX

    raw = os.environ.get(ENV_PREFIX + "HEADER_TIMEOUT_S")
    return float(raw) if raw else DEFAULT_HEADER_TIMEOUT_S


class HeaderTimeoutProtocol(_Base):
    """Closes a connection whose request headers are not complete in time."""

    header_timeout_s: float | None = None  # read on the first connection, after the CLI
    # has exported its settings

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._disarm()  # headers are in: a request is running

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if HeaderTimeoutProtocol.header_timeout_s is None:
            HeaderTimeoutProtocol.header_timeout_s = header_timeout_s()
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
