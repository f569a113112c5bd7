"""Token cache policy, driven with an injected clock and fetch function (our own seams)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from sidecar.credentials.token_cache import TokenCache, backoff, refresh_delay
from sidecar.credentials.token_client import AccessToken, TokenKey
from sidecar.errors import TokenRejected, TokenUnavailable
from sidecar.secret import Secret
from sidecar.tasks import Background

KEY = TokenKey("as", "spiffe://td/app", "client_credentials", "https://rs", None, ("read",), "jkt")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeAS:
    """A token source we control: counts calls, can fail, can block until released."""

    def __init__(self, clock: Clock, lifetime: float = 300.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self, key: TokenKey) -> AccessToken:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        now = self.clock()
        return AccessToken(Secret(f"t{self.calls}"), "DPoP", now, now + self.lifetime, key.scopes)


@pytest.fixture
async def background() -> AsyncIterator[Background]:
    bg = Background("test")
    yield bg
    await bg.close()


def cache_for(background: Background, clock: Clock) -> TokenCache:
    return TokenCache(background, clock=clock, rand=lambda: 0.5)  # jitter at its midpoint


async def test_one_fetch_for_many_concurrent_callers(background: Background) -> None:
    clock = Clock()
    source = FakeAS(clock)
    source.gate = asyncio.Event()
    cache = cache_for(background, clock)
    waiters = [asyncio.ensure_future(cache.get(KEY, source)) for _ in range(100)]
    await asyncio.sleep(0)  # let every caller reach the single flight
    source.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert source.calls == 1
    assert len({id(t) for t in tokens}) == 1


async def test_refresh_ahead_serves_current_token_and_renews_in_background(
    background: Background,
) -> None:
    clock = Clock()
    source = FakeAS(clock, lifetime=300)
    cache = cache_for(background, clock)
    first = await cache.get(KEY, source)
    clock.now += 200  # past min(75% = 225, 300 - 60 = 240)? no: before refresh point
    assert await cache.get(KEY, source) is first
    assert source.calls == 1
    clock.now += 30  # 230 s: past the refresh point (225), still valid
    source.gate = asyncio.Event()
    served = await cache.get(KEY, source)  # does not wait for the refresh
    assert served is first
    await asyncio.wait_for(_until(lambda: source.calls == 2), 5)  # the refresh is under way
    assert await cache.get(KEY, source) is first  # and callers still do not wait for it
    source.gate.set()
    await asyncio.wait_for(_until(lambda: cache.peek(KEY) is not first), 5)
    assert (await cache.get(KEY, source)).value == Secret("t2")


async def test_expired_token_is_never_served(background: Background) -> None:
    clock = Clock()
    source = FakeAS(clock, lifetime=300)
    cache = cache_for(background, clock)
    await cache.get(KEY, source)
    source.fail = TokenUnavailable("AS down")
    clock.now += 299.5  # inside the safety margin before expiry
    with pytest.raises(TokenUnavailable) as info:
        await cache.get(KEY, source)
    assert info.value.retry_after is not None
    assert info.value.retry_after >= 1


async def test_failing_as_is_not_hammered(background: Background) -> None:
    clock = Clock()
    source = FakeAS(clock)
    source.fail = TokenRejected("invalid_client")
    cache = cache_for(background, clock)
    for _ in range(5):
        with pytest.raises(TokenRejected):
            await cache.get(KEY, source)
    assert source.calls == 1  # the rest were answered from the failure, inside the backoff
    clock.now += backoff(1, lambda: 1.0) + 0.1
    with pytest.raises(TokenRejected):
        await cache.get(KEY, source)
    assert source.calls == 2


async def test_valid_token_keeps_being_served_while_the_as_is_down(background: Background) -> None:
    clock = Clock()
    source = FakeAS(clock, lifetime=300)
    cache = cache_for(background, clock)
    first = await cache.get(KEY, source)
    source.fail = TokenUnavailable("AS down")
    clock.now += 250
    for _ in range(3):
        assert await cache.get(KEY, source) is first
        await asyncio.wait_for(_until(lambda: not cache._flights.in_flight(KEY)), 5)
    assert source.calls == 2  # one background attempt, then backoff


async def test_keys_never_share_tokens(background: Background) -> None:
    clock = Clock()
    source = FakeAS(clock)
    cache = cache_for(background, clock)
    other_scope = TokenKey(**{**KEY.__dict__, "scopes": ("write",)})
    other_jkt = TokenKey(**{**KEY.__dict__, "jkt": "other"})
    tokens = [await cache.get(k, source) for k in (KEY, other_scope, other_jkt)]
    assert len({t.value.reveal() for t in tokens}) == 3


async def test_evict_forgets_only_that_token(background: Background) -> None:
    clock = Clock()
    source = FakeAS(clock)
    cache = cache_for(background, clock)
    first = await cache.get(KEY, source)
    cache.evict(KEY, first)
    second = await cache.get(KEY, source)
    assert second is not first
    cache.evict(KEY, first)  # stale eviction does not drop the new token
    assert cache.peek(KEY) is second


def test_refresh_and_backoff_schedules() -> None:
    assert refresh_delay(3600, lambda: 0.5) == pytest.approx(2700)  # 75%
    assert refresh_delay(200, lambda: 0.5) == pytest.approx(140)  # expiry - 60 s
    assert refresh_delay(60, lambda: 0.5) == pytest.approx(30)  # never below half-life
    assert refresh_delay(3600, lambda: 0.0) == pytest.approx(2430)  # -10%
    assert [round(backoff(n, lambda: 0.5)) for n in (1, 2, 3, 10, 20)] == [1, 2, 4, 300, 300]


async def _until(predicate: Callable[[], bool]) -> None:
    """Yield to the event loop until ``predicate`` holds; bounded, never time-based."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)  # one loop turn: lets background tasks run
    raise AssertionError("condition never became true")
