"""Config hot reload: notice when the config file changes and ask the runtime to reload it.

Works with the Kubernetes ConfigMap volume pattern: the mounted file is a symlink chain
(``sidecar.yaml -> ..data/sidecar.yaml``, ``..data -> ..2026_11_23…``) and an update swaps
``..data`` atomically. The file is therefore identified by what the path resolves to *and* its
inode, mtime and size, polled off the event loop. SIGHUP triggers the same reload at once.

The watcher outlives any failure of a reload (a file that cannot be parsed, a bug): it logs
the exception's type, counts it through ``on_failure`` and keeps watching, so a later good
edit is applied.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("sidecar.reload")

Fingerprint = tuple[str, int, int, int, int] | None


def fingerprint(path: Path) -> Fingerprint:
    """Identity of the file's current content; None when it cannot be read right now."""
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return None
    return (real, stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


class ConfigWatcher:
    def __init__(
        self,
        path: Path,
        interval: float,
        reload: Callable[[], Awaitable[bool]],
        *,
        baseline: Fingerprint = None,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.interval = interval
        self._reload = reload
        self._on_failure = on_failure
        self._last: Fingerprint = baseline  # or from baseline()

    async def baseline(self) -> None:
        """Remember the file as it is now; later changes trigger a reload."""
        self._last = await asyncio.to_thread(fingerprint, self.path)

    async def run(self) -> None:
        last = self._last
        while True:
            await asyncio.sleep(self.interval)
            current = await asyncio.to_thread(fingerprint, self.path)
            if current is None or current == last:
                continue  # mid-swap or unchanged: look again next time
            last = current
            log.info("config file changed", extra={"source": str(self.path)})
            try:
                await self._reload()
            except Exception as exc:
                self._on_failure()
                log.error(
                    "config reload failed; keeping the last good config",
                    extra={"source": str(self.path), "error": type(exc).__name__},
                )
