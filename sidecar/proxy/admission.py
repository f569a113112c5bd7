"""Admission: which new connections from the app are served, and what running out of file
descriptors looks like.

Two limits, checked once per accepted connection (never per request):

- ``limits.max_app_connections``: open connections from the app. Beyond it a new connection is
  closed at once (nothing read, nothing sent upstream) and counted; each one waiting for a
  route's connection slot costs memory, so this also bounds the queues of a stalled upstream.
- The file-descriptor limit (``RLIMIT_NOFILE``). POSIX hands out the lowest free descriptor,
  so a new socket numbered at or above ``limit - reserve`` means fewer than ``reserve`` are
  left: the connection is closed, so the admin port, upstream and token connections still get
  descriptors. Without this, uvloop (libuv) meets EMFILE by accepting and closing connections
  on every listener, the admin port's probes included, and says nothing at all.

Running out is logged at most once per minute (with the limit) and counted: by itself it
reads like an unreachable authorization server or upstream.
"""

from __future__ import annotations

import errno
import logging
import resource
import time
from collections.abc import Callable

log = logging.getLogger("sidecar.listener")

LOG_INTERVAL = 60.0  # seconds between two log lines about the same limit
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})


def fd_limit() -> int:
    """The soft RLIMIT_NOFILE (what ``open``/``accept`` run into)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def fd_reserve(limit: int) -> int:
    """Descriptors kept free of app connections: 10 % of the limit, 16 to 256."""
    return max(16, min(256, limit // 10))


class Admission:
    def __init__(
        self,
        max_connections: int,
        *,
        limit: int | None = None,
        reserve: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections  # swapped on reload
        self.fd_limit = fd_limit() if limit is None else limit
        # reserve=False: a listener the reserve is kept for (the admin port) may use it.
        self.fd_ceiling = self.fd_limit - (fd_reserve(self.fd_limit) if reserve else 0)
        self._clock = clock
        self._logged: dict[str, float] = {}
        self.refused: dict[str, int] = {"limit": 0, "fd_limit": 0}  # app connections closed
        self.fd_exhausted: dict[str, int] = {"accept": 0, "upstream": 0}

    def admit(self, open_connections: int, fd: int) -> bool:
        """Whether to serve a connection just accepted as descriptor ``fd``."""
        if fd >= self.fd_ceiling:
            self.refused["fd_limit"] += 1
            self.fd_exhausted["accept"] += 1
            self._log_fds("accept")
            return False
        if open_connections >= self.max_connections:
            self.refused["limit"] += 1
            if self._due("limit"):
                log.warning(
                    "connection limit reached: closing new connections from the app",
                    extra={"max_app_connections": self.max_connections},
                )
            return False
        return True

    def check_error(self, exc: BaseException, where: str) -> None:
        """Count and log an OSError that means the process ran out of descriptors."""
        if isinstance(exc, OSError) and exc.errno in EXHAUSTED:
            self.fd_exhausted[where] = self.fd_exhausted.get(where, 0) + 1
            self._log_fds(where)

    def _log_fds(self, where: str) -> None:
        if self._due("fds"):
            log.error(
                "file descriptor limit reached (EMFILE)",
                extra={
                    "fd_limit": self.fd_limit,
                    "reserve": self.fd_limit - self.fd_ceiling,
                    "where": where,
                },
            )

    def _due(self, what: str) -> bool:
        now = self._clock()
        last = self._logged.get(what)
        if last is not None and now - last < LOG_INTERVAL:
            return False
        self._logged[what] = now
        return True
