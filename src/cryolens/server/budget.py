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
        self._waiting = 0

    @asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        size = max(0, min(size, self.limit))
        # With room, the reservation is taken at once: one event loop runs every request, so
        # nothing comes between the check and the count. (The condition's lock and a wait_for
        # task per request cost the loop ~30 us each time.) As before, a request that fits
        # goes ahead of one that waits for more room than there is.
        if self.used + size > self.limit:
            await self._wait_for_room(size)
        self.used += size
        try:
            yield
        finally:
            self.used -= size
            if self._waiting:
                cond = self._condition()
                async with cond:
                    cond.notify_all()

    async def _wait_for_room(self, size: int) -> None:
        """Returns once ``size`` more bytes fit (the caller counts them before it awaits
        anything); :class:`Busy` after ``wait_s``."""
        cond = self._condition()
        self._waiting += 1
        try:
            async with cond:
                await asyncio.wait_for(cond.wait_for(lambda: self.used + size <= self.limit),
                                       self.wait_s)
        except asyncio.TimeoutError:
            if self._on_refusal is not None:
                self._on_refusal()
            raise Busy(f"the server is parsing {self.used} bytes of other requests (budget "
                       f"{self.limit}); retry shortly") from None
        finally:
            self._waiting -= 1

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # made on first use, inside the server's event loop
            self._cond = asyncio.Condition()
        return self._cond
