"""What a chaos scenario measures and the bounds it is held to (pure, apart from reading the
sidecar's /proc entries): answers by kind, recovery, token requests per key per window, fds and
RSS. Every bound is a COUNT or a multiple of a timeout from the scenario's own config (its
units), never the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from chaos.harness import ConfigMap, Environment, SidecarProcess
from chaos.load import LOST, REFUSED, SHED, Answer, LoadGenerator, between, kinds, recovery
from sidecar.devstack.auth_server import TokenRequestRecord

# Bounds shared by every scenario (see docs/reliability.md for why these numbers).
RECOVERY_TIMEOUTS = 3  # N: recovered within N x the timeout that governs the fault (default)
TOKEN_WINDOW = 1.0  # seconds
TOKENS_PER_WINDOW = 4  # K: at most K token requests per key in any TOKEN_WINDOW
FD_SLACK = 8  # on top of the route's max_connections (pooled upstream connections may stay)
RSS_GROWTH_MB = 16.0  # VmRSS after the scenario minus before (after warm-up)
RSS_PEAK_MB = 64.0  # VmHWM during the scenario minus VmRSS before
RELOAD_RSS_MB = 1.0  # reload churn: VmRSS growth over the second half of the swaps
OK = frozenset({"200"})
LOAD_LIMIT = 60.0  # seconds: no scenario's load runs longer


@dataclass
class Check:
    what: str
    passed: bool
    figure: str


@dataclass
class Result:
    name: str
    title: str
    fault: str
    sent: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    during: Counter[str] = field(default_factory=Counter)
    readiness: Counter[str] = field(default_factory=Counter)  # /readyz statuses during the fault
    recovery_first: float | None = None
    recovery_all: float | None = None
    recovery_bound: float | None = None
    token_requests: int = 0
    token_keys: int = 0
    token_max_window: int = 0
    rss_before: float = 0.0
    rss_after: float = 0.0
    rss_peak: float = 0.0
    fds_before: int = 0
    fds_after: int = 0
    pooled_before: int = 0  # of fds_before: connections to the upstream (the route's pool)
    known: str | None = None  # the #16 defect it fails on main today (EXPECTED_FAILURES)
    measured_after: bool = False  # False: the scenario ends the process (signal, crash)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks)

    @property
    def status(self) -> str:
        known = self.known
        if self.passed:
            return (
                f"passed this run (listed as #{known}: flip once it keeps passing)"
                if known
                else "passed"
            )
        return f"known failing (#{known})" if known else "FAILED"

    @property
    def fails_run(self) -> bool:
        return not self.passed and self.known is None

    def check(self, what: str, passed: bool, figure: object) -> None:
        self.checks.append(Check(what, passed, str(figure)))


# -- measuring ------------------------------------------------------------------------------------


def token_window_max(records: Iterable[TokenRequestRecord], window: float) -> tuple[int, int]:
    """(keys seen, the most requests one key made in any ``window`` seconds)."""
    times: dict[tuple[object, ...], list[float]] = defaultdict(list)
    for r in records:
        key = (r.client_id, r.scope, r.resources, r.dpop_jkt, r.client_cert_sha256)
        times[key].append(r.at)
    most = 0
    for stamps in times.values():
        stamps.sort()
        low = 0
        for high, at in enumerate(stamps):
            while at - stamps[low] >= window:
                low += 1
            most = max(most, high - low + 1)
    return len(times), most


async def settled_fds(sidecar: SidecarProcess, bound: int, limit: float = 3.0) -> int:
    """Open fds once they are within ``bound`` or have stopped falling (closing is async)."""
    deadline = time.monotonic() + limit
    count = sidecar.fds()
    while count > bound and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        count = sidecar.fds()
    return count


@dataclass
class Timeline:
    before: float  # seconds of load before the fault
    during: float
    after: float


class Run:
    """One scenario's running parts; the scenario body drives faults through it."""

    def __init__(
        self, env: Environment, sidecar: SidecarProcess, result: Result, rate: float
    ) -> None:
        self.env = env
        self.sidecar = sidecar
        self.result = result
        self.load = LoadGenerator(*sidecar.listen, rate=rate)
        self.fault_start = 0.0
        self.fault_end = 0.0
        self.max_connections = 16
        self.reload_docs: list[dict[str, Any]] = []
        self.config_map: ConfigMap | None = None
        self.token_index = len(env.stack.auth_server.token_requests)
        self.saas_index = len(env.stack.saas.requests)

    async def timeline(
        self,
        times: Timeline,
        start: Callable[[], Awaitable[None]],
        end: Callable[[], Awaitable[None]],
    ) -> list[Answer]:
        """Load throughout: ``before``, then ``start()`` (which may itself take a while, e.g. a
        rotation loop), ``during``, ``end()``, then ``after``. Bounded: the load gives up at
        :data:`LOAD_LIMIT` seconds whatever the scenario does."""
        load = asyncio.ensure_future(self.load.run(LOAD_LIMIT))
        faulted = asyncio.Event()
        probe = asyncio.ensure_future(self._probe_readiness(faulted))
        try:
            await asyncio.sleep(times.before)
            self.fault_start = time.monotonic()
            await start()
            await asyncio.sleep(times.during)
            await end()
            self.fault_end = time.monotonic()
            faulted.set()
            await asyncio.sleep(times.after)
            self.load.stop()
            return await load
        finally:
            faulted.set()
            load.cancel()
            await probe

    async def _probe_readiness(self, over: asyncio.Event) -> None:
        """What /readyz said while the fault was on, twice a second (informational: the status
        policy, `readiness: startup` or `strict`, decides whether a fault flips it)."""
        while not over.is_set():
            if self.fault_start:
                status, _ = await self.sidecar.get("/readyz", timeout=1.0)
                self.result.readiness[str(status or "no answer")] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(over.wait(), 0.5)

    def token_records(self) -> list[TokenRequestRecord]:
        return self.env.stack.auth_server.token_requests[self.token_index :]

    def credential_checks(self, answers: list[Answer]) -> None:
        """No request reached the API without a credential, and no 200 came without one."""
        seen = self.env.stack.saas.requests[self.saas_index :]
        bare = sum(1 for s in seen if not any(k.lower() == "authorization" for k, _ in s.headers))
        verified = sum(1 for s in seen if s.status == 200 and s.token_claims is not None)
        ok = sum(1 for a in answers if a.ok)
        self.result.check("no request reached the API without a credential", bare == 0, bare)
        self.result.check(
            "every 200 was a request the API verified", ok <= verified, f"{ok} <= {verified}"
        )


def summarise(run: Run, answers: list[Answer], allowed_during: Iterable[str]) -> None:
    """The checks every fault scenario shares."""
    result = run.result
    result.sent = sum(1 for a in answers if a.kind not in (SHED, REFUSED))
    result.kinds = kinds(answers)
    before = [a for a in answers if a.done < run.fault_start]  # answered before it
    during = between(answers, run.fault_start, run.fault_end)
    result.during = kinds(during)
    lost = sum(n for k, n in result.kinds.items() if k in LOST)
    result.check("no request lost (every request got an HTTP answer)", lost == 0, lost)
    shed = result.kinds.get(SHED, 0) + result.kinds.get(REFUSED, 0)
    result.check("every request was sent (none shed or refused)", shed == 0, shed)
    bad_before = sum(1 for a in before if not a.ok)
    result.check("every request answered before the fault succeeded", bad_before == 0, bad_before)
    allowed = OK | set(allowed_during)
    unexpected = {k: n for k, n in result.during.items() if k not in allowed}
    result.check(
        f"during the fault only {', '.join(sorted(allowed))}", not unexpected, unexpected or "-"
    )
    run.credential_checks(answers)
    records = run.token_records()
    result.token_requests = len(records)
    result.token_keys, result.token_max_window = token_window_max(records, TOKEN_WINDOW)
    result.check(
        f"<= {TOKENS_PER_WINDOW} token requests per key per {TOKEN_WINDOW:g} s",
        result.token_max_window <= TOKENS_PER_WINDOW,
        result.token_max_window,
    )


def check_recovery(
    run: Run, answers: list[Answer], timeout: float, what: str, n: int = RECOVERY_TIMEOUTS
) -> None:
    result = run.result
    found = recovery(answers, run.fault_end)
    result.recovery_first, result.recovery_all = found.first_ok, found.all_ok
    bound = n * timeout
    result.recovery_bound = bound
    result.check(
        f"recovered within {n} x {what} ({bound:g} s) of the fault's end",
        found.all_ok is not None and found.all_ok <= bound,
        "never" if found.all_ok is None else f"{found.all_ok:.2f} s",
    )


async def resource_checks(run: Run, slack: int, *, pool_apart: bool = False) -> None:
    """fds, RSS and peak RSS against the baseline. ``pool_apart``: the upstream pool is
    bounded on its own (at most the route's ``max_connections``: it may have grown past its
    warm-up size under load), and every other fd must be back within ``slack``."""
    result, sidecar = run.result, run.sidecar
    result.measured_after = True
    result.fds_after = await settled_fds(sidecar, result.fds_before + slack)
    result.rss_after, result.rss_peak = sidecar.rss_mb(), sidecar.peak_rss_mb()
    if pool_apart:
        pooled = sidecar.connections_to(run.env.upstream.port)
        before, after = result.fds_before - result.pooled_before, result.fds_after - pooled
        result.check(
            f"open fds besides the upstream pool back to baseline (+{slack})",
            after <= before + slack,
            f"{before} -> {after}",
        )
        result.check(
            f"upstream connections <= max_connections ({run.max_connections})",
            pooled <= run.max_connections,
            f"{result.pooled_before} -> {pooled}",
        )
    else:
        result.check(
            f"open fds back to baseline (+{slack})",
            result.fds_after <= result.fds_before + slack,
            f"{result.fds_before} -> {result.fds_after}",
        )
    growth = result.rss_after - result.rss_before
    result.check(f"RSS grew <= {RSS_GROWTH_MB:g} MB", growth <= RSS_GROWTH_MB, f"{growth:+.1f} MB")
    peak = result.rss_peak - result.rss_before
    result.check(
        f"peak RSS <= baseline + {RSS_PEAK_MB:g} MB", peak <= RSS_PEAK_MB, f"{peak:+.1f} MB"
    )
