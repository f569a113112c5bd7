"""Write-side flow control for the data path's asyncio protocols (listener and origin client).

The transport calls ``pause_writing`` when its buffer is full and ``resume_writing`` when it has
drained; writers await :meth:`WriteFlow.waiter` before writing more, so a slow peer slows the
sender instead of growing memory.
"""

from __future__ import annotations

import asyncio


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
