"""The parse budget: room is taken at once while it lasts; past it requests wait, are let in as
room frees, and are refused (Busy) after the wait."""
from __future__ import annotations

import asyncio

import pytest

from cryolens.errors import Busy
from cryolens.server.budget import ParseBudget


def test_reservations_within_the_limit_need_no_wait_and_are_returned():
    async def main():
        budget = ParseBudget(100, wait_s=0.01)
        async with budget.reserve(60), budget.reserve(40):
            assert budget.used == 100
        assert budget.used == 0
        async with budget.reserve(10_000):  # larger than the budget: runs alone
            assert budget.used == 100

    asyncio.run(main())


def test_past_the_limit_requests_wait_for_room_and_time_out_busy():
    async def main():
        refused = []
        budget = ParseBudget(100, wait_s=1.0, on_refusal=lambda: refused.append(1))
        order: list[str] = []
        release = asyncio.Event()

        async def hold(name: str, size: int) -> None:
            async with budget.reserve(size):
                order.append(name)
                await release.wait()

        first = asyncio.create_task(hold("first", 80))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(hold("waiting", 50))  # does not fit: waits
        await asyncio.sleep(0.05)
        small = asyncio.create_task(hold("small", 10))  # fits: goes ahead of the waiting one
        await asyncio.sleep(0.05)
        assert order == ["first", "small"] and budget.used == 90
        release.set()
        await asyncio.gather(first, waiting, small)
        assert order == ["first", "small", "waiting"]
        assert budget.used == 0 and not refused

        quick = ParseBudget(100, wait_s=0.05, on_refusal=lambda: refused.append(1))
        async with quick.reserve(100):
            with pytest.raises(Busy, match="parsing 100 bytes"):
                async with quick.reserve(1):
                    pass
        assert refused == [1] and quick.used == 0
        async with quick.reserve(100):  # the refusal left nothing behind
            assert quick.used == 100

    asyncio.run(main())
