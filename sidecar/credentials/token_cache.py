"""Token cache: one token per :class:`TokenKey`, renewed before it expires.

Policy (see docs/operations.md):
- A request never waits while a valid token exists. Each key is renewed on a timer
  (:meth:`TokenCache.run`) at :func:`refresh_delay` after its request was sent: min(75% of
  the lifetime, lifetime - 60 s), jittered, never before half-life nor (for lifetimes over
  120 s) inside the last 60 s. A request arriving past that instant also starts it.
- Single flight: one token request per key in flight, however many callers.
- A request waits for a token request at most ``wait`` seconds (``tokens.wait``), then gets
  503 ``token_unavailable`` with Retry-After; the token request itself goes on.
- Failures while a valid token is still held back off exponentially (1 s -> 5 min, jittered,
  never past the token's end) and the token keeps being served. Without a usable token the
  retries are short (0.5 s -> 4 s, jittered: :func:`short_retry`), by the timer too, and
  callers inside the interval get the last error at once: the AS sees at most one request
  per key per interval. An expired token is never served.
- Keys not asked for during ``LAPSE_LIFETIMES`` token lifetimes are no longer renewed; their
  entry is forgotten once its token expired (the next request fetches again).
- Bounded: least recently used keys are dropped beyond ``maxsize``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from sidecar.credentials.token_client import DEFAULT_LIFETIME, AccessToken, TokenKey
from sidecar.errors import IdentityUnavailable, ProxyError, TokenUnavailable
from sidecar.tasks import Background, SingleFlight

log = logging.getLogger("sidecar.token_cache")

MIN_BACKOFF = 1.0
MAX_BACKOFF = 300.0
SHORT_RETRY_MIN = 0.5
SHORT_RETRY_MAX = 4.0  # no usable token: the AS sees at most one request per key this often
LAPSE_LIFETIMES = 3.0
DEFAULT_WAIT = 3.0
_IDLE_TICK = 60.0  # the timer wakes at least this often (a clock that jumps is caught up)


K = TypeVar("K")
V = TypeVar("V")


class _Lru(collections.OrderedDict[K, V]):
    """Least recently used beyond ``maxsize`` goes, as with ``cachetools.LRUCache``: getting
    or setting a key marks it used. The data path's hit (:meth:`TokenCache.fresh`) is two C
    calls (``OrderedDict.get``, ``move_to_end``) instead of LRUCache's five Python ones."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def get(self, key: K, default: Any = None) -> Any:
        value = collections.OrderedDict.get(self, key, _MISSING)
        if value is _MISSING:
            return default
        self.move_to_end(key)
        return value

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


_MISSING: Any = object()
_get = collections.OrderedDict.get


def refresh_delay(lifetime: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds after sending at which to renew: min(75%, lifetime - 60 s), jittered ±10%,
    clamped to [half-life, lifetime - 60 s] (lifetime > 120 s) or [half-life, 75%]."""
    half = lifetime * 0.5
    base = max(min(lifetime * 0.75, lifetime - 60.0), half)
    upper = lifetime - 60.0 if lifetime > 120.0 else lifetime * 0.75
    return float(min(max(base * (0.9 + 0.2 * rand()), half), upper))


def short_retry(failures: int, rand: Callable[[], float] = random.random) -> float:
    """While no usable token is held: 0.5 s, 1 s, 2 s, then 4 s, each jittered down to half."""
    step = min(SHORT_RETRY_MAX, SHORT_RETRY_MIN * 2.0 ** max(0, failures - 1))
    return float(step * (0.5 + 0.5 * rand()))


def backoff(failures: int, rand: Callable[[], float] = random.random) -> float:
    """1 s, 2 s, 4 s ... capped at 5 min, with ±20% jitter."""
    return float(min(MAX_BACKOFF, MIN_BACKOFF * 2.0 ** max(0, failures - 1)) * (0.8 + 0.4 * rand()))


Fetch = Callable[[TokenKey], Awaitable[AccessToken]]


@dataclass
class _Entry:
    fetch: Fetch
    used_at: float  # the last time a request asked for this key
    token: AccessToken | None = None
    refresh_at: float = math.inf
    failures: int = 0
    retry_at: float = 0.0
    error: ProxyError | None = None
    lifetime: float = DEFAULT_LIFETIME  # of the last token: the lapse is counted in these

    def lapsed(self, now: float) -> bool:
        return now - self.used_at > LAPSE_LIFETIMES * self.lifetime

    def next_attempt(self, now: float) -> float:
        """When the timer should ask the AS for this key again."""
        token = self.token
        if token is not None and token.usable(now):
            return max(self.refresh_at, self.retry_at)
        return self.retry_at


class TokenCache:
    def __init__(
        self,
        background: Background,
        *,
        maxsize: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        wait: float = DEFAULT_WAIT,
    ) -> None:
        self._entries: _Lru[TokenKey, _Entry] = _Lru(maxsize)
        self._flights: SingleFlight[TokenKey, AccessToken] = SingleFlight(background)
        self._clock = clock
        self._rand = rand
        self._changed = asyncio.Event()
        self._idle: set[str] = set()  # servers whose every key lapsed and was forgotten
        self.wait = wait  # tokens.wait: how long a request waits for a token request
        self.hits = 0
        self.misses = 0
        self.refreshes = 0

    async def get(self, key: TokenKey, fetch: Fetch) -> AccessToken:
        return (await self.lookup(key, fetch))[0]

    def fresh(self, key: TokenKey, fetch: Fetch) -> AccessToken | None:
        """The cached token for ``key`` if it is usable now (a hit; a refresh starts in the
        background when one is due), else None. Never waits."""
        now = self._clock()
        entries = self._entries
        entry = _get(entries, key)  # _Lru.get inlined: this is every request's lookup
        if entry is not None:
            entries.move_to_end(key)
            token = entry.token
            if token is not None and now < token.usable_until:
                self.hits += 1
                # Keeps the key renewed by the timer (LAPSE_LIFETIMES), with the fetch of the
                # config in force (an old one's route is not held on to after a reload).
                entry.used_at, entry.fetch = now, fetch
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
        if entry is not None:
            entry.used_at, entry.fetch = now, fetch
            if entry.error is not None and now < entry.retry_at:
                raise _with_retry_after(entry.error, entry.retry_at - now)
        flight = self._start(key, fetch, refresh=False)
        try:
            return await asyncio.wait_for(asyncio.shield(flight), self.wait), False
        except TimeoutError:
            if flight.done() and not flight.cancelled():
                # The fetch ended as the wait did: its outcome (a token, or its own error),
                # never the wait's bare TimeoutError (the app would get a 500).
                return flight.result(), False
            raise TokenUnavailable(
                f"no token within tokens.wait ({self.wait:g} s): the authorization server is "
                "slow; the token request goes on",
                retry_after=1,
            ) from None

    def valid_tokens(self) -> list[tuple[TokenKey, AccessToken]]:
        """Every cached token still usable now (for readiness and expiry metrics)."""
        now = self._clock()
        return [
            (key, entry.token)
            for key, entry in list(self._entries.items())
            if entry.token is not None and entry.token.usable(now)
        ]

    def expiry_seconds(self, servers: Iterable[str]) -> dict[str, float]:
        """Per authorization server, for ``sidecar_token_expiry_seconds`` (never missing):
        seconds until the soonest-expiring usable token of its keys in use; when none is
        usable, minus the seconds since the last one expired (0: it never had one); NaN when
        every key of it lapsed (no request asked for one in LAPSE_LIFETIMES lifetimes)."""
        now = self._clock()
        usable: dict[str, float] = {}
        expired: dict[str, float] = {}
        in_use: set[str] = set()
        for key, entry in list(self._entries.items()):
            if entry.lapsed(now):
                continue
            in_use.add(key.server)
            token = entry.token
            if token is None:
                continue
            left = token.expires_at - now
            if token.usable(now):
                usable[key.server] = min(left, usable.get(key.server, left))
            else:
                expired[key.server] = max(min(left, 0.0), expired.get(key.server, -math.inf))
        report: dict[str, float] = {}
        for server in servers:
            if server in usable:
                report[server] = usable[server]
            elif server in expired:
                report[server] = expired[server]
            elif server not in in_use and (server in self._idle or self._has_server(server)):
                report[server] = math.nan  # idle: its keys lapsed (or were forgotten so)
            else:
                report[server] = 0.0
        return report

    def _has_server(self, server: str) -> bool:
        return any(k.server == server for k in list(self._entries))

    def seconds_left(self, token: AccessToken) -> float:
        return token.expires_at - self._clock()

    def drop_server(self, server: str) -> None:
        """Forget every token of one authorization server (its config changed)."""
        for key in [k for k in self._entries if k.server == server]:
            del self._entries[key]
        self._idle.discard(server)

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

    # -- the timer -----------------------------------------------------------------------------

    def refresh_due(self) -> float | None:
        """Start every renewal or retry that is due now; forget lapsed keys whose token
        expired. Returns the seconds until the next one is due (None: nothing scheduled)."""
        now = self._clock()
        soonest = math.inf
        for key, entry in list(self._entries.items()):
            if self._flights.in_flight(key):
                continue
            if entry.lapsed(now):
                if entry.token is None or not entry.token.usable(now):
                    self._entries.pop(key, None)
                    self._idle.add(key.server)
                continue
            at = entry.next_attempt(now)
            if at <= now:
                self._start(key, entry.fetch, refresh=entry.token is not None)
            else:
                soonest = min(soonest, at)
        return soonest - now if soonest < math.inf else None

    async def run(self) -> None:
        """Renew tokens at their refresh instant, whether or not a request arrives."""
        while True:
            self._changed.clear()
            delay = self.refresh_due()
            timeout = _IDLE_TICK if delay is None else min(delay, _IDLE_TICK)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(timeout, 0.01))

    # -- fetching ------------------------------------------------------------------------------

    def _start(self, key: TokenKey, fetch: Fetch, *, refresh: bool) -> asyncio.Task[AccessToken]:
        if not self._flights.in_flight(key):
            self.refreshes += refresh
        return self._flights.start(key, lambda k: self._fetch(k, fetch))

    async def _fetch(self, key: TokenKey, fetch: Fetch) -> AccessToken:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(fetch, used_at=self._clock())
            self._idle.discard(key.server)
        try:
            token = await fetch(key)
        except ProxyError as exc:
            now = self._clock()
            entry.failures += 1
            entry.error = exc
            held = entry.token if entry.token is not None and entry.token.usable(now) else None
            if held is not None:  # the long backoff, but never past the token's end
                delay = min(backoff(entry.failures, self._rand), held.usable_until - now)
            else:
                delay = short_retry(entry.failures, self._rand)
            entry.retry_at = now + delay
            self._changed.set()
            # The first failure of a run, then one line in 30: short retries (every few
            # seconds while the AS is down) must not flood the log; the counter has them all.
            loud = entry.failures == 1 or entry.failures % 30 == 0
            log.log(
                logging.WARNING if loud else logging.DEBUG,
                "token request failed",
                extra={
                    "authorization_server": key.server,
                    "error": exc.upstream_error or exc.code,
                    "failures": entry.failures,
                    "retry_in": round(delay, 1),
                    "serving_cached": held is not None,
                },
            )
            raise _with_retry_after(exc, delay) from exc
        except Exception:
            # Not ours (a bug): still no hot retry loop from the timer.
            entry.retry_at = self._clock() + short_retry(entry.failures + 1, self._rand)
            raise
        entry.token = token
        entry.lifetime = token.lifetime
        entry.failures = 0
        entry.error = None
        entry.retry_at = 0.0
        entry.refresh_at = token.issued_at + refresh_delay(token.lifetime, self._rand)
        self._changed.set()
        return token


def _with_retry_after(error: ProxyError, delay: float) -> ProxyError:
    """A fresh copy for each caller (a shared instance would pile up tracebacks)."""
    retryable = isinstance(error, TokenUnavailable | IdentityUnavailable)
    retry_after = max(1, math.ceil(delay)) if retryable else None
    return type(error)(
        error.detail,
        route=error.route,
        retry_after=retry_after,
        upstream_error=error.upstream_error,
    )
