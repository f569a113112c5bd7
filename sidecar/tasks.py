"""Owned background tasks and keyed single-flight.

No bare ``asyncio.create_task``: every task is held by a :class:`Background` that cancels it on
shutdown, so nothing runs on after ``close()`` and no exception is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

log = logging.getLogger("sidecar.tasks")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Background:
    """A set of tasks owned by one component."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(
        self, coro: Coroutine[Any, Any, V], name: str | None = None, *, awaited: bool = False
    ) -> asyncio.Task[V]:
        """Run ``coro`` as an owned task. ``awaited``: its callers collect the outcome."""
        task = asyncio.get_running_loop().create_task(coro, name=name or self._name)
        self._tasks.add(task)
        task.add_done_callback(self._awaited_done if awaited else self._done)
        return task

    def _awaited_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the callers got it; no "never retrieved" warning

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error(
                "background task failed",
                extra={"task": task.get_name(), "error": type(exc).__name__},
            )

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)


class SingleFlight(Generic[K, V]):
    """At most one call of ``fn(key)`` in flight per key; every concurrent caller shares it.

    A caller that is cancelled does not cancel the shared call (the others still wait on it).
    """

    def __init__(self, background: Background) -> None:
        self._background = background
        self._flights: dict[K, asyncio.Task[V]] = {}

    def in_flight(self, key: K) -> bool:
        return key in self._flights

    async def settle(self) -> None:
        """Until every call in flight now has finished (whatever its outcome)."""
        await asyncio.gather(*self._flights.values(), return_exceptions=True)

    def start(self, key: K, fn: Callable[[K], Awaitable[V]]) -> asyncio.Task[V]:
        task = self._flights.get(key)
        if task is None:

            async def run() -> V:
                try:
                    return await fn(key)
                finally:
                    self._flights.pop(key, None)

            task = self._background.spawn(run(), name="single-flight", awaited=True)
            self._flights[key] = task
        return task

    async def do(self, key: K, fn: Callable[[K], Awaitable[V]]) -> V:
        return await asyncio.shield(self.start(key, fn))
