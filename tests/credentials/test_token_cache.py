"""Token cache policy, driven with an injected clock and fetch function (our own seams)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable

import pytest

from sidecar.credentials.token_cache import (
    SHORT_RETRY_MAX,
    TokenCache,
    backoff,
    refresh_delay,
    short_retry,
)
from sidecar.credentials.token_client import AccessToken, TokenKey
from sidecar.errors import IdentityUnavailable, TokenRejected, TokenUnavailable
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


JITTER_EXTREMES = (0.0, 1e-12, 0.25, 0.5, 0.75, 1.0 - 1e-12, 1.0)
LIFETIMES = [x / 4 for x in range(1, 4 * 300)] + list(range(300, 100_000, 7)) + [86400, 31536000]


@pytest.mark.parametrize("rand", JITTER_EXTREMES)
def test_refresh_instant_stays_within_its_bounds_for_every_lifetime(rand: float) -> None:
    for lifetime in LIFETIMES:
        delay = refresh_delay(lifetime, lambda: rand)
        assert delay >= lifetime * 0.5 - 1e-9, lifetime  # never before half-life
        if lifetime > 120:
            assert delay <= lifetime - 60 + 1e-9, lifetime  # never inside the last 60 s
        else:
            assert delay <= lifetime * 0.75 + 1e-9, lifetime
        base = max(min(lifetime * 0.75, lifetime - 60), lifetime * 0.5)
        assert base * 0.9 - 1e-9 <= delay <= base * 1.1 + 1e-9, lifetime  # jitter is ±10 %


def test_refresh_instant_regressions_from_the_review() -> None:
    # ±10 % used to land inside the last 60 s for lifetimes of 120-240 s.
    for lifetime in (121, 150, 200, 239, 240):
        assert refresh_delay(lifetime, lambda: 1.0) <= lifetime - 60


def test_short_retry_is_capped_at_a_few_seconds() -> None:
    for failures in range(1, 50):
        for rand in JITTER_EXTREMES:
            assert 0.25 <= short_retry(failures, lambda r=rand: r) <= SHORT_RETRY_MAX
    assert short_retry(30, lambda: 1.0) == SHORT_RETRY_MAX


async def test_without_a_usable_token_retries_are_short_and_single_flight(
    background: Background,
) -> None:
    clock = Clock()
    source = FakeAS(clock)
    source.fail = TokenUnavailable("AS down")
    cache = cache_for(background, clock)
    for _ in range(20):
        with pytest.raises(TokenUnavailable):
            await cache.get(KEY, source)
        with pytest.raises(TokenUnavailable) as info:  # inside the interval: the last error
            await cache.get(KEY, source)
        assert info.value.retry_after is not None
        assert info.value.retry_after <= SHORT_RETRY_MAX
        clock.now += SHORT_RETRY_MAX  # never more than this between two requests to the AS
    assert source.calls == 20  # one per interval, never the 5-minute backoff
    source.fail = None
    clock.now += SHORT_RETRY_MAX
    assert (await cache.get(KEY, source)).value == Secret("t21")  # recovered at once


async def test_the_long_backoff_never_outlasts_the_token_held(background: Background) -> None:
    clock = Clock()
    source = FakeAS(clock, lifetime=300)
    cache = cache_for(background, clock)
    first = await cache.get(KEY, source)
    source.fail = TokenUnavailable("AS down")
    for _ in range(12):  # failures pile up: 1, 2, 4 ... 300 s of backoff
        clock.now = max(clock.now, cache._entries[KEY].retry_at)
        if not first.usable(clock.now):
            break
        cache.refresh_due()
        await cache.settle()
        assert cache._entries[KEY].retry_at <= first.usable_until  # never past the token's end
    clock.now = first.usable_until
    with pytest.raises(TokenUnavailable) as info:
        await cache.get(KEY, source)  # no token now: a request goes out, not the old error
    assert info.value.retry_after is not None
    assert info.value.retry_after <= SHORT_RETRY_MAX


async def test_a_request_waits_at_most_tokens_wait_and_the_fetch_goes_on(
    background: Background,
) -> None:
    clock = Clock()
    source = FakeAS(clock)
    source.gate = asyncio.Event()  # a hung AS
    cache = TokenCache(background, clock=clock, rand=lambda: 0.5, wait=0.01)
    with pytest.raises(TokenUnavailable) as info:
        await cache.get(KEY, source)
    assert info.value.retry_after == 1
    assert "tokens.wait" in info.value.detail
    assert cache._flights.in_flight(KEY)  # the token request goes on
    with pytest.raises(TokenUnavailable):
        await cache.get(KEY, source)  # joins it (still one request), waits again at most 0.01
    source.gate.set()
    await cache.settle()
    assert source.calls == 1
    assert (await cache.get(KEY, source)).value == Secret("t1")


async def test_the_timer_renews_at_the_refresh_instant_without_a_request(
    background: Background,
) -> None:
    clock = Clock()
    source = FakeAS(clock, lifetime=300)
    cache = cache_for(background, clock)
    first = await cache.get(KEY, source)
    assert cache.refresh_due() == pytest.approx(225)  # nothing due yet; next in 225 s
    clock.now += 225
    assert cache.refresh_due() is None  # started (in flight: nothing else scheduled)
    await cache.settle()
    assert source.calls == 2
    assert cache.peek(KEY) is not first


async def test_the_timer_task_runs_and_stops(background: Background) -> None:
    clock = Clock()
    source = FakeAS(clock, lifetime=300)
    cache = cache_for(background, clock)
    await cache.get(KEY, source)
    clock.now += 230
    task = background.spawn(cache.run(), name="timer")
    await _until(lambda: source.calls == 2)
    task.cancel()


async def test_unused_keys_lapse_after_three_lifetimes(background: Background) -> None:
    clock = Clock()
    source = FakeAS(clock, lifetime=300)
    cache = cache_for(background, clock)
    await cache.get(KEY, source)
    for _ in range(3):  # renewed by the timer while recently used...
        clock.now += 290
        cache.refresh_due()
        await cache.settle()
    calls = source.calls
    assert calls == 4
    clock.now += 290  # nobody asked for 1160 s (> 3 lifetimes): no more renewals
    cache.refresh_due()
    await cache.settle()
    assert source.calls == calls
    clock.now += 300
    cache.refresh_due()
    assert cache.peek(KEY) is None
    assert len(cache) == 0  # forgotten once expired
    assert math.isnan(cache.expiry_seconds(["as"])["as"])  # idle, not failing: no alert
    await cache.get(KEY, source)  # asked for again: a value again
    assert cache.expiry_seconds(["as"]) == {"as": 300.0}


async def test_expiry_series_never_vanish(background: Background) -> None:
    clock = Clock()
    source = FakeAS(clock, lifetime=300)
    cache = cache_for(background, clock)
    assert cache.expiry_seconds(["as", "other"]) == {"as": 0.0, "other": 0.0}
    await cache.get(KEY, source)
    assert cache.expiry_seconds(["as"]) == {"as": 300.0}
    source.fail = TokenUnavailable("AS down")
    clock.now += 310  # expired 10 s ago, the refresh failing
    assert cache.expiry_seconds(["as"]) == {"as": -10.0}
    clock.now += 1000  # idle: every key lapsed
    assert math.isnan(cache.expiry_seconds(["as"])["as"])


async def test_identity_errors_carry_retry_after(background: Background) -> None:
    clock = Clock()
    source = FakeAS(clock)
    source.fail = IdentityUnavailable("no SVID", retry_after=2)
    cache = cache_for(background, clock)
    with pytest.raises(IdentityUnavailable) as info:
        await cache.get(KEY, source)
    assert info.value.retry_after is not None
    with pytest.raises(IdentityUnavailable) as again:
        await cache.get(KEY, source)
    assert again.value.retry_after is not None
    assert again.value.status == 503


@pytest.mark.parametrize("outcome", ["token", "rejected"])
async def test_a_fetch_that_ends_as_tokens_wait_ends_gives_its_own_outcome(
    background: Background, outcome: str
) -> None:
    """The wait and the fetch ending at once (chaos: as_hung) must give the fetch's outcome
    (a token, or its documented error), never the wait's raw TimeoutError (a 500). With
    ``wait=0`` the fetch, which finishes without suspending, ends while the wait is cancelled:
    the race, deterministically."""
    clock = Clock()
    source = FakeAS(clock)
    if outcome == "rejected":
        source.fail = TokenRejected("the AS said no", route="r")
    cache = TokenCache(background, clock=clock, rand=lambda: 0.5, wait=0)
    if outcome == "token":
        token, hit = await cache.lookup(KEY, source)
        assert (token.value, hit) == (Secret("t1"), False)
    else:
        with pytest.raises(TokenRejected):
            await cache.lookup(KEY, source)
    assert source.calls == 1


def test_the_lru_drops_the_least_recently_used_and_a_get_marks_use() -> None:
    from sidecar.credentials.token_cache import _Lru

    lru: _Lru[str, int] = _Lru(2)
    lru["a"], lru["b"] = 1, 2
    assert lru.get("a") == 1  # "a" is now the most recently used
    lru["c"] = 3
    assert list(lru) == ["a", "c"]  # "b" went
    lru["a"] = 4  # setting marks use as well
    lru["d"] = 5
    assert list(lru) == ["a", "d"]
    assert lru.get("zz") is None
    assert lru.get("zz", 0) == 0
