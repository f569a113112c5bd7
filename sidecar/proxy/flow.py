"""Flow control for the data path's asyncio protocols (listener and origin client), both ways.

Writing: the transport calls ``pause_writing`` when its buffer is full and ``resume_writing``
when it has drained; writers await :meth:`WriteFlow.waiter` before writing more. Reading: a
:class:`BodyBuffer` pauses the peer once too much is waiting for its reader. Either way a slow
side slows the other instead of growing memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable


class WriteFlow:
    __slots__ = ("_paused", "_waiter")

    def __init__(self) -> None:
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def waiter(self) -> asyncio.Future[None] | None:
        """A future to await before writing more, or None when writing may go on."""
        if not self._paused:
            return None
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def fail(self, error: BaseException) -> None:
        """The connection is gone: a writer waiting to drain gets ``error``."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)


class BodyBuffer:
    """Body bytes received ahead of their reader, bounded: above ``high`` buffered bytes the
    peer is paused (``pause``), below ``low`` it is resumed. The listener buffers the app's
    request bodies this way, the origin client the APIs' answers."""

    __slots__ = ("_chunks", "_high", "_low", "_pause", "_paused", "_resume", "_size")

    def __init__(
        self,
        pause: Callable[[], None],
        resume: Callable[[], None],
        *,
        high: int = 256 * 1024,
        low: int = 64 * 1024,
    ) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._paused = False
        self._pause, self._resume = pause, resume
        self._high, self._low = high, low

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._high and not self._paused:
            self._paused = True
            self._pause()

    def pop(self) -> bytes:
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        self._relieve()
        return chunk

    def take_all(self) -> bytes:
        data = b"".join(self._chunks)
        self.clear()
        return data

    def clear(self) -> None:
        if self._chunks:
            self._chunks.clear()
            self._size = 0
            self._relieve()

    def _relieve(self) -> None:
        if self._paused and self._size < self._low:
            self._paused = False
            self._resume()


class Slots:
    """At most ``limit`` holders at once; the rest wait in order. Taking a free slot does not
    suspend (the data path's usual case), unlike ``asyncio.Semaphore``'s ``async with``.

    A wait is bounded: :meth:`take` gives up at a deadline, or as soon as a ``gone`` future
    completes (the app closed its connection), so a stalled upstream cannot collect an
    unbounded queue of requests nobody waits for any more."""

    __slots__ = ("_free", "_waiters", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = limit
        self._waiters: collections.deque[asyncio.Future[bool]] = collections.deque()

    @property
    def free(self) -> int:
        return self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def take_now(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(
        self, deadline: float | None = None, gone: asyncio.Future[None] | None = None
    ) -> bool:
        """Wait for a slot: True once held; False if loop time ``deadline`` passed or ``gone``
        completed first (then no slot is held and the waiter has left the queue)."""
        if self.take_now():
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        timer = None if deadline is None else loop.call_at(deadline, _give_up, waiter)
        on_gone = None
        if gone is not None:
            if gone.done():
                _give_up(waiter)
            else:
                on_gone = lambda _: _give_up(waiter)  # noqa: E731 - removed again below
                gone.add_done_callback(on_gone)
        try:
            held = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.give()  # the slot was handed to us as we were cancelled: pass it on
            else:
                self._leave(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if on_gone is not None and gone is not None:
                gone.remove_done_callback(on_gone)
        if not held:
            self._leave(waiter)
        return held

    def _leave(self, waiter: asyncio.Future[bool]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot goes straight to the next in line
                return
        self._free += 1


def _give_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
