"""A server-wide budget of request-body bytes being received and parsed at once.

Each body costs memory while it is read and parsed (the bytes, then the float32 volumes and, a
volume at a time, its Python objects). The budget caps the sum over all requests in flight: a
request reserves its declared ``Content-Length`` (or the body limit when it sends none) before
reading, waits up to ``wait_s`` for room, and is otherwise answered 503 with ``Retry-After``.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cryolens.errors import Busy


class ParseBudget:
    """At most ``limit`` bytes reserved at once; one request larger than the whole budget runs
    alone."""

    def __init__(self, limit: int, wait_s: float, on_refusal=None) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.used = 0
        self._on_refusal = on_refusal
        self._cond: asyncio.Condition | None = None

    @asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        size = max(0, min(size, self.limit))
        if self._cond is None:  # made on first use, inside the server's event loop
            self._cond = asyncio.Condition()
        cond = self._cond
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self.used + size <= self.limit),
                                       self.wait_s)
            except asyncio.TimeoutError:
                if self._on_refusal is not None:
                    self._on_refusal()
                raise Busy(f"the server is parsing {self.used} bytes of other requests (budget "
                           f"{self.limit}); retry shortly") from None
            self.used += size
        try:
            yield
        finally:
            async with cond:
                self.used -= size
                cond.notify_all()
