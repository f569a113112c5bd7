"""Slots: a bounded number of holders, the rest served in order, cancellation loses nothing."""

from __future__ import annotations

import asyncio

from sidecar.proxy.flow import Slots


async def test_free_slots_are_taken_without_waiting_and_the_rest_queue_in_order() -> None:
    slots = Slots(2)
    assert slots.take_now()
    assert slots.take_now()
    assert not slots.take_now()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await slots.take()
        order.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)  # let all three queue
    assert order == []
    slots.give()
    await tasks[0]
    slots.give()
    await tasks[1]
    assert order == [0, 1]
    assert not slots.take_now()  # the third still waits: no slot appeared from nowhere
    slots.give()
    await tasks[2]
    assert order == [0, 1, 2]
    for _ in range(2):  # the last two holders leave: both slots are free again
        slots.give()
    assert slots.take_now()
    assert slots.take_now()
    assert not slots.take_now()


async def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    slots = Slots(1)
    assert slots.take_now()
    first = asyncio.create_task(slots.take())
    second = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.give()  # handed to the first waiter ...
    first.cancel()  # ... which is cancelled before it runs: the slot must reach the second
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 5)
    assert not slots.take_now()


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    slots = Slots(1)
    assert slots.take_now()
    waiting = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    slots.give()
    assert slots.take_now()  # the slot was not handed to the cancelled waiter


async def test_a_wait_gives_up_at_its_deadline_and_leaves_the_queue() -> None:
    slots = Slots(1)
    assert slots.take_now()
    loop = asyncio.get_running_loop()
    assert await slots.take(loop.time()) is False  # a deadline already passed
    assert slots.waiting == 0
    slots.give()
    assert slots.free == 1  # nobody was handed the slot


async def test_a_wait_ends_when_its_app_goes_away() -> None:
    slots = Slots(1)
    assert slots.take_now()
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(slots.take(None, gone))
    behind = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    assert slots.waiting == 2
    gone.set_result(None)
    assert await waiting is False
    assert slots.waiting == 1
    slots.give()  # goes to the one still waiting, not to the departed
    assert await behind is True
    assert slots.free == 0
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    assert await slots.take(None, done) is False  # gone before it even queued
