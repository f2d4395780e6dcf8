"""A server-wide budget of request-body bytes being received and parsed at once.

Each body costs memory while it is read and parsed (the bytes, then, for JSON, the float32
volumes and, a volume at a time, its Python objects). The budget caps the sum over all requests
in flight. A request reserves its body as the bytes arrive (:meth:`ParseBudget.reserve_body`),
not what it declares: a slow upload, or a chunked one of unknown size, holds only what it has
sent, so two uploads trickling at the minimum rate cannot starve every other request. A chunk
that does not fit waits up to ``wait_s`` for room and is otherwise answered 503 with
``Retry-After``; the reservation is returned when parsing ends.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from cryolens.errors import Busy

if TYPE_CHECKING:
    from starlette.requests import Request


class Reservation:
    """The bytes one request holds in a :class:`ParseBudget`."""

    def __init__(self, budget: ParseBudget) -> None:
        self.budget = budget
        self.held = 0

    async def grow(self, size: int) -> None:
        """Hold ``size`` more bytes (a request never holds more than the whole budget, so one
        larger than the budget runs alone); waits for room, :class:`Busy` after ``wait_s``."""
        budget = self.budget
        size = max(0, min(size, budget.limit - self.held))
        # With room, the bytes are taken at once: one event loop runs every request, so
        # nothing comes between the check and the count. (The condition's lock and a wait_for
        # task per request cost the loop ~30 us each time.) A request that fits goes ahead of
        # one that waits for more room than there is.
        if budget.used + size > budget.limit:
            await budget._wait_for_room(size)
        budget.used += size
        self.held += size


class ParseBudget:
    """At most ``limit`` bytes reserved at once."""

    def __init__(self, limit: int, wait_s: float, on_refusal=None) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.used = 0
        self._on_refusal = on_refusal
        self._cond: asyncio.Condition | None = None
        self._waiting = 0

    @asynccontextmanager
    async def reserve(self, size: int = 0) -> AsyncIterator[Reservation]:
        """A reservation of ``size`` bytes to start with, returned on exit."""
        reservation = Reservation(self)
        try:
            await reservation.grow(size)
            yield reservation
        finally:
            self.used -= reservation.held
            reservation.held = 0
            if self._waiting:
                cond = self._condition()
                async with cond:
                    cond.notify_all()

    @asynccontextmanager
    async def reserve_body(self, request: Request) -> AsyncIterator[Reservation]:
        """While inside, every body chunk ``request`` receives is reserved as it arrives."""
        async with self.reserve() as reservation:
            original = request._receive

            async def receive():
                message = await original()
                if message["type"] == "http.request":
                    await reservation.grow(len(message.get("body", b"")))
                return message

            request._receive = receive
            try:
                yield reservation
            finally:
                request._receive = original

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
