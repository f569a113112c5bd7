"""Token cache: one token per :class:`TokenKey`, renewed before it expires.

Policy (see docs/operations.md):
- A request never waits while a valid token exists. From ``refresh_at`` =
  min(75% of lifetime, expiry - 60 s), jittered ±10%, the next request starts a background
  refresh and is served the current token.
- Single flight: one token request per key in flight, however many callers.
- Failures back off exponentially (1 s -> 5 min, jittered). While backing off, a still-valid
  token keeps being served; without one, callers get the last error at once (no hot retry
  loop against a failing AS). An expired token is never served.
- Bounded: least recently used keys are dropped beyond ``maxsize``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cachetools import LRUCache

from sidecar.credentials.token_client import AccessToken, TokenKey
from sidecar.errors import ProxyError, TokenUnavailable
from sidecar.tasks import Background, SingleFlight

log = logging.getLogger("sidecar.token_cache")

MIN_BACKOFF = 1.0
MAX_BACKOFF = 300.0


def refresh_delay(lifetime: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds after issuance at which to renew: min(75%, lifetime - 60 s), jittered ±10%."""
    base = min(lifetime * 0.75, lifetime - 60.0)
    base = max(base, lifetime * 0.5)  # short-lived tokens: still renew at half-life at least
    return float(base * (0.9 + 0.2 * rand()))


def backoff(failures: int, rand: Callable[[], float] = random.random) -> float:
    """1 s, 2 s, 4 s ... capped at 5 min, with ±20% jitter."""
    return float(min(MAX_BACKOFF, MIN_BACKOFF * 2.0 ** max(0, failures - 1)) * (0.8 + 0.4 * rand()))


@dataclass
class _Entry:
    token: AccessToken | None = None
    refresh_at: float = math.inf
    failures: int = 0
    retry_at: float = 0.0
    error: ProxyError | None = None


Fetch = Callable[[TokenKey], Awaitable[AccessToken]]


class TokenCache:
    def __init__(
        self,
        background: Background,
        *,
        maxsize: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._entries: LRUCache[TokenKey, _Entry] = LRUCache(maxsize=maxsize)
        self._flights: SingleFlight[TokenKey, AccessToken] = SingleFlight(background)
        self._clock = clock
        self._rand = rand
        self.hits = 0
        self.misses = 0
        self.refreshes = 0

    async def get(self, key: TokenKey, fetch: Fetch) -> AccessToken:
        return (await self.lookup(key, fetch))[0]

    def fresh(self, key: TokenKey, fetch: Fetch) -> AccessToken | None:
        """The cached token for ``key`` if it is usable now (a hit; a refresh starts in the
        background when one is due), else None. Never waits."""
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            token = entry.token
            if token is not None and now < token.usable_until:
                self.hits += 1
                if now >= entry.refresh_at and now >= entry.retry_at:
                    self._start(key, fetch, refresh=True)
                return token
        return None

    async def lookup(self, key: TokenKey, fetch: Fetch) -> tuple[AccessToken, bool]:
        """The token for ``key`` and whether it came from the cache (a hit)."""
        token = self.fresh(key, fetch)
        if token is not None:
            return token, True
        now = self._clock()
        entry = self._entries.get(key)
        self.misses += 1
        if entry is not None and entry.error is not None and now < entry.retry_at:
            raise _with_retry_after(entry.error, entry.retry_at - now)
        return await self._flights.do(key, lambda k: self._fetch(k, fetch)), False

    def valid_tokens(self) -> list[tuple[TokenKey, AccessToken]]:
        """Every cached token still usable now (for readiness and expiry metrics)."""
        now = self._clock()
        return [
            (key, entry.token)
            for key, entry in list(self._entries.items())
            if entry.token is not None and entry.token.usable(now)
        ]

    def seconds_left(self, token: AccessToken) -> float:
        return token.expires_at - self._clock()

    def drop_server(self, server: str) -> None:
        """Forget every token of one authorization server (its config changed)."""
        for key in [k for k in self._entries if k.server == server]:
            del self._entries[key]

    def evict(self, key: TokenKey, token: AccessToken) -> None:
        """Forget ``token`` (the resource server rejected it), unless already replaced."""
        entry = self._entries.get(key)
        if entry is not None and entry.token is token:
            entry.token = None

    async def settle(self) -> None:
        """Until the token requests in flight now (refreshes included) have finished."""
        await self._flights.settle()

    def clear(self) -> None:
        self._entries.clear()

    def peek(self, key: TokenKey) -> AccessToken | None:
        entry = self._entries.get(key)
        return entry.token if entry else None

    def __len__(self) -> int:
        return len(self._entries)

    def _start(self, key: TokenKey, fetch: Fetch, *, refresh: bool) -> None:
        if not self._flights.in_flight(key):
            self.refreshes += refresh
            self._flights.start(key, lambda k: self._fetch(k, fetch))

    async def _fetch(self, key: TokenKey, fetch: Fetch) -> AccessToken:
        entry = self._entries.get(key) or _Entry()
        self._entries[key] = entry
        try:
            token = await fetch(key)
        except ProxyError as exc:
            entry.failures += 1
            delay = backoff(entry.failures, self._rand)
            entry.retry_at = self._clock() + delay
            entry.error = exc
            still_valid = entry.token is not None and entry.token.usable(self._clock())
            log.warning(
                "token request failed",
                extra={
                    "authorization_server": key.server,
                    "error": exc.code,
                    "retry_in": round(delay, 1),
                    "serving_cached": still_valid,
                },
            )
            raise _with_retry_after(exc, delay) from exc
        entry.token = token
        entry.failures = 0
        entry.error = None
        entry.retry_at = 0.0
        entry.refresh_at = token.issued_at + refresh_delay(token.lifetime, self._rand)
        return token


def _with_retry_after(error: ProxyError, delay: float) -> ProxyError:
    """A fresh copy for each caller (a shared instance would pile up tracebacks)."""
    retry_after = max(1, math.ceil(delay)) if isinstance(error, TokenUnavailable) else None
    return type(error)(
        error.detail,
        route=error.route,
        retry_after=retry_after,
        upstream_error=error.upstream_error,
    )
