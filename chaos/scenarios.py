"""The scenarios of ``make chaos``: a fault, the load around it, and the bounds it must keep
(chaos/measure.py). Scenarios whose defect is not fixed on main yet are listed in
:data:`EXPECTED_FAILURES` with the defect's number: the report shows them as known failing and
they do not fail the run. When the fix merges, delete the line: the scenario then gates CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from chaos.faults import Fault, FaultProxy
from chaos.harness import ConfigMap, Environment, SidecarProcess, environment
from chaos.load import LOST, REFUSED, SHED, Answer, LoadGenerator, between, kinds
from chaos.measure import (
    FD_SLACK,
    RECOVERY_TIMEOUTS,
    RELOAD_RSS_MB,
    Result,
    Run,
    Timeline,
    check_recovery,
    resource_checks,
    summarise,
)

# Scenario -> the issue #16 defect that makes it fail on main today. One list; flip by deleting.
# Empty since 2026-12-02: reload_churn's fds were the upstream pool grown under load (now
# bounded apart: at most max_connections, every other fd back to the baseline), and
# svid_expiry recovers within 1-3.5 s (bound 6 s) since the Workload API reconnect bound, with
# at most one token request per key per second since rotations no longer refetch tokens.
EXPECTED_FAILURES: dict[str, str] = {}

# -- scenarios ------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    title: str
    fault: str
    body: Callable[[Run, float], Awaitable[None]]  # (run, scale)
    stack: dict[str, Any] = field(default_factory=dict)  # environment() options
    config: Callable[[Environment], dict[str, Any]] = lambda env: env.config()
    workers: int = 1
    nofile: int | None = None
    rate: float = 100.0
    config_map: bool = False  # the config is a kubelet-style ConfigMap tree (reload churn)


def _times(scale: float, before: float, during: float, after: float) -> Timeline:
    return Timeline(before * scale, during * scale, after)


async def _proxy_fault(
    run: Run,
    proxy: FaultProxy,
    fault: Fault,
    times: Timeline,
    allowed: Iterable[str],
    timeout: float,
    what: str,
    n: int = RECOVERY_TIMEOUTS,
    **knobs: float,
) -> list[Answer]:
    """Switch ``fault`` on for ``times.during``; load goes on long enough after it to see a
    recovery within its bound (``n`` x ``timeout``) or its absence."""

    async def start() -> None:
        await proxy.set(fault, **knobs)

    async def end() -> None:
        await proxy.set(Fault.PASS)

    times = Timeline(times.before, times.during, max(times.after, n * timeout + 1.0))
    answers = await run.timeline(times, start, end)
    summarise(run, answers, allowed)
    check_recovery(run, answers, timeout, what, n)
    await resource_checks(run, run.max_connections + FD_SLACK)
    return answers


async def steady(run: Run, scale: float) -> None:
    async def nothing() -> None:
        return None

    answers = await run.timeline(_times(scale, 2, 2, 2), nothing, nothing)
    summarise(run, answers, ())
    await resource_checks(run, run.max_connections + FD_SLACK)


async def x509_rotation(run: Run, scale: float) -> None:
    rotations = max(1, int(10 * scale))
    wlapi = run.env.stack.workload_api

    async def rotate() -> None:
        for _ in range(rotations):
            await asyncio.to_thread(wlapi.rotate_x509)
            await asyncio.sleep(1.0)

    async def done() -> None:
        return None

    answers = await run.timeline(_times(scale, 2, 0, 3), rotate, done)
    summarise(run, answers, ())
    run.result.notes.append(f"{rotations} X.509-SVID rotations, 1 s apart, mTLS client auth")
    await resource_checks(run, run.max_connections + FD_SLACK)


async def jwt_rotation(run: Run, scale: float) -> None:
    rotations = max(1, int(6 * scale))
    trust = run.env.stack.trust_domain

    async def rotate() -> None:
        for _ in range(rotations):
            trust.rotate_jwt_key()
            await asyncio.sleep(2.0)

    async def done() -> None:
        return None

    answers = await run.timeline(_times(scale, 2, 0, 3), rotate, done)
    summarise(run, answers, ())
    run.result.notes.append(
        f"{rotations} JWT signing-key rotations 2 s apart; JWT-SVIDs live 4 s, tokens 3 s"
    )
    await resource_checks(run, run.max_connections + FD_SLACK)


async def svid_expiry(run: Run, scale: float) -> None:
    wlapi = run.env.stack.workload_api
    stop = asyncio.Event()
    issued = [wlapi.x509_svid]

    async def rotator() -> None:  # the agent keeps rotating at half-life, as SPIRE does
        while not stop.is_set():
            issued.append(await asyncio.to_thread(wlapi.rotate_x509))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 3.0)

    task = asyncio.ensure_future(rotator())
    try:
        await _proxy_fault(
            run, run.env.workload, Fault.REFUSE, _times(1, 2, 12, 12),
            ("503 identity_unavailable", "503 token_unavailable"),
            2.0, "the AS timeout",
        )  # fmt: skip
    finally:
        stop.set()
        await task
    # The AS recorded the client certificate of each token request: was it still valid then?
    expiry = {
        hashlib.sha256(m.certificate.public_bytes(serialization.Encoding.DER)).hexdigest(): (
            m.expires_at
        )
        for m in issued
    }
    offset = time.time() - time.monotonic()  # the AS stamps monotonic time; SVIDs carry epochs
    expired = sum(
        1
        for r in run.token_records()
        if r.client_cert_sha256 in expiry and r.at + offset > expiry[r.client_cert_sha256]
    )
    run.result.check(
        "no token request authenticated with an expired X.509-SVID", expired == 0, expired
    )
    run.result.notes.append(
        "Workload API socket gone 12 s; X.509-SVIDs live 6 s (rotated every 3 s), tokens 4 s"
    )


async def as_refused(run: Run, scale: float) -> None:
    await _proxy_fault(
        run, run.env.auth, Fault.REFUSE, _times(scale, 2, 20, 0),
        ("503 token_unavailable",), 2.0, "the AS timeout",
    )  # fmt: skip
    run.result.notes.append(
        "AS refuses connections for 20 s (long enough for the failure backoff to grow past the "
        "bound); tokens live 4 s"
    )


async def as_garbage(run: Run, scale: float) -> None:
    await _proxy_fault(
        run, run.env.auth, Fault.GARBAGE, _times(scale, 2, 8, 0),
        ("503 token_unavailable",), 2.0, "the AS timeout",
    )  # fmt: skip


async def as_slow(run: Run, scale: float) -> None:
    answers = await _proxy_fault(
        run, run.env.auth, Fault.DELAY, _times(scale, 2, 12, 0),
        ("503 token_unavailable",), 5.0, "the AS timeout", 1, delay=2.0,
    )  # fmt: skip
    del answers
    expired = sum(
        1 for s in run.env.stack.saas.requests[run.saas_index :] if s.error == "invalid_token"
    )
    run.result.check("no expired token reached the API", expired == 0, expired)
    run.result.notes.append("AS answers 2 s late (AS timeout 5 s); tokens live 4 s")


async def as_hung(run: Run, scale: float) -> None:
    timeout = 10.0
    answers = await _proxy_fault(
        run, run.env.auth, Fault.STALL, _times(scale, 2, 12, 0),
        ("503 token_unavailable",), timeout, "the AS timeout", 1,
    )  # fmt: skip
    during = between(answers, run.fault_start, run.fault_end)
    longest = max((a.done - a.sent for a in during), default=0.0)
    run.result.check(
        f"no request waited more than half the AS timeout ({timeout / 2:g} s) for a token",
        longest <= timeout / 2,
        f"{longest:.2f} s",
    )
    run.result.notes.append("AS accepts and never answers for 12 s (AS timeout 10 s); tokens 4 s")


async def upstream_stall(run: Run, scale: float) -> None:
    total = 4.0
    run.load.timeout = 2 * total  # the app gives up: what it abandoned must not be sent later
    answers = await _proxy_fault(
        run, run.env.upstream, Fault.STALL, _times(scale, 2, 12, 0),
        ("504 upstream_timeout", "503 upstream_busy"), total, "total_timeout", 1,
    )  # fmt: skip
    during = between(answers, run.fault_start, run.fault_end)
    longest = max((a.done - a.sent for a in during), default=0.0)
    run.result.check(
        f"every request answered within 1.25 x total_timeout ({1.25 * total:g} s), slot wait "
        "included",
        longest <= 1.25 * total,
        f"{longest:.2f} s",
    )
    seen = len(run.env.stack.saas.requests) - run.saas_index
    answered = sum(1 for a in answers if a.status)
    run.result.check(
        "no request reached the API after its app gave up", seen <= answered, f"{seen} sent"
    )
    run.result.notes.append(
        f"upstream stalls 12 s (total_timeout {total:g} s, max_connections 16); the app gives "
        f"up after {2 * total:g} s"
    )


async def upstream_trickle(run: Run, scale: float) -> None:
    await _proxy_fault(
        run, run.env.upstream, Fault.TRICKLE, _times(scale, 2, 8, 0),
        ("504 upstream_timeout", "503 upstream_busy"), 4.0, "total_timeout", 1, interval=0.5,
    )  # fmt: skip


async def upstream_reset(run: Run, scale: float) -> None:
    await _proxy_fault(
        run, run.env.upstream, Fault.RESET, _times(scale, 2, 6, 0),
        ("502 upstream_unavailable",), 1.0, "connect_timeout",
    )  # fmt: skip


def _reload_docs(env: Environment) -> list[dict[str, Any]]:
    """Two valid variants (so each swap changes something) and an invalid one."""
    base = env.config()
    # A route on system CAs (the default for a real SaaS): a reload that keeps old SSL contexts
    # alive leaks the whole system trust store each time, as issue #16.2 measured.
    base["destinations"].append(
        {
            "name": "other",
            "host": "other.example",
            "upstream": "https://127.0.0.1:9",
            "authorization_server": "dev",
            "allow_private": True,
            "scopes": {"default": ["other:read"]},
        }
    )
    base["reload"] = {"watch": True, "interval": 0.1}
    variant = yaml.safe_load(yaml.safe_dump(base))
    variant["destinations"][0]["via"] = True
    invalid = yaml.safe_load(yaml.safe_dump(base))
    invalid["destinations"][0]["read_timeout"] = -1
    return [base, variant, invalid]


async def reload_churn(run: Run, scale: float) -> None:
    swaps = max(4, int(40 * scale))
    invalid_every = swaps // 3
    docs, cm = run.reload_docs, run.config_map
    assert cm is not None
    counts = {"success": 0, "failure": 0, "missed": 0}
    halfway: list[float] = []

    async def churn() -> None:
        for index in range(swaps):
            if index == swaps // 2:
                halfway.append(run.sidecar.rss_mb())
            invalid = index % invalid_every == invalid_every - 1
            doc = docs[2] if invalid else docs[index % 2]
            outcome = "failure" if invalid else "success"
            before = await run.sidecar.metric("sidecar_config_reloads_total", outcome=outcome)
            cm.publish(doc)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                now = await run.sidecar.metric("sidecar_config_reloads_total", outcome=outcome)
                if now > before:
                    counts[outcome] += 1
                    break
                await asyncio.sleep(0.05)
            else:
                counts["missed"] += 1
        cm.publish(docs[0])

    async def done() -> None:
        return None

    answers = await run.timeline(Timeline(2 * scale, 0, 3), churn, done)
    summarise(run, answers, ())
    result = run.result
    result.check("every swap was applied or rejected", counts["missed"] == 0, counts)
    # A leak would grow with the number of reloads; the pool may only grow to its bound.
    await resource_checks(run, FD_SLACK, pool_apart=True)
    # Memory after N reloads is the current config's: the second half of the swaps adds nothing
    # (the first half may still warm allocator arenas).
    late = result.rss_after - halfway[0]
    result.check(
        f"the last {swaps - swaps // 2} reloads grew RSS <= {RELOAD_RSS_MB:g} MB",
        late <= RELOAD_RSS_MB,
        f"{late:+.1f} MB",
    )
    result.notes.append(
        f"{swaps} ConfigMap-style swaps ({counts['failure']} invalid) under load; one route on "
        "system CAs"
    )


async def sigterm_drain(run: Run, scale: float) -> None:
    sidecar = run.sidecar
    await run.env.upstream.set(Fault.DELAY, delay=0.3)  # requests are in flight at the signal
    load = asyncio.ensure_future(run.load.run(10.0))
    await asyncio.sleep(3.0 * scale)
    signalled = time.monotonic()
    run.fault_start = run.fault_end = signalled
    os.kill(sidecar.pid, signal.SIGTERM)
    await asyncio.sleep(1.0)
    run.load.stop()
    answers = await load
    code = await sidecar.wait_exit(sidecar.grace + 5)
    await run.env.upstream.set(Fault.PASS)
    result = run.result
    result.sent = sum(1 for a in answers if a.kind not in (SHED, REFUSED))
    result.kinds = kinds(answers)
    before = [a for a in answers if a.sent < signalled]
    after = [a for a in answers if a.sent >= signalled]
    result.during = kinds(after)
    bad = sum(1 for a in before if not a.ok)
    result.check("every request sent before SIGTERM was answered 200", bad == 0, bad)
    lost_after = sum(1 for a in after if a.kind in LOST)
    result.notes.append(
        f"after the signal: {len(after)} sent, {lost_after} on connections the drain closed "
        f"(an HTTP client retries those), the rest refused or answered"
    )
    result.check(f"exited 0 within --grace ({sidecar.grace:g} s) + 5 s", code == 0, code)
    run.credential_checks(answers)


async def worker_crash(run: Run, scale: float) -> None:
    sidecar = run.sidecar
    load = asyncio.ensure_future(run.load.run(4.0))
    await asyncio.sleep(2.0)
    workers = sidecar.workers_pids()
    run.fault_start = run.fault_end = time.monotonic()
    os.kill(workers[0], signal.SIGKILL)
    code = await sidecar.wait_exit(sidecar.grace + 5)
    run.load.stop()
    answers = await load
    result = run.result
    result.sent = sum(1 for a in answers if a.kind not in (SHED, REFUSED))
    result.kinds = kinds(answers)
    before = [a for a in answers if a.done < run.fault_start]  # answered before it
    bad = sum(1 for a in before if not a.ok)
    result.check("every request answered before the crash succeeded", bad == 0, bad)
    result.check("the supervisor exits 128+SIGKILL (137), as a shell reports it", code == 137, code)
    result.notes.append(f"--workers 2; SIGKILL to worker {workers[0]} after 2 s")


async def fd_exhaustion(run: Run, scale: float) -> None:
    sidecar = run.sidecar
    limit = run.sidecar.nofile or 0
    held: list[asyncio.StreamWriter] = []
    run.load.rate = 20.0
    run.load.timeout = 5.0
    health: list[int] = []

    async def exhaust() -> None:
        for _ in range(limit + 32):  # more connections than the sidecar has fds
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(*sidecar.listen)
                held.append(writer)
        await asyncio.sleep(1.0)  # the sidecar's accept loop meets EMFILE meanwhile
        for _ in range(3):
            status, _ = await sidecar.get("/healthz", timeout=2.0)
            health.append(status)

    async def release() -> None:
        for writer in held:
            writer.close()

    answers = await run.timeline(_times(scale, 2, 3, 6), exhaust, release)
    result = run.result
    result.sent = sum(1 for a in answers if a.kind not in (SHED, REFUSED))
    result.kinds = kinds(answers)
    result.during = kinds(between(answers, run.fault_start, run.fault_end))
    result.check("the admin port answers /healthz at the fd limit", health == [200] * 3, health)
    lines = [
        line
        for line in sidecar.log_text().splitlines()
        if ("EMFILE" in line or "open files" in line.lower()) and str(limit) in line
    ]
    result.check(
        f"EMFILE logged with the limit ({limit}), at most once a minute",
        1 <= len(lines) <= 2,
        len(lines),
    )
    check_recovery(run, answers, 1.0, "connect_timeout")
    run.credential_checks(answers)
    result.notes.append(
        f"RLIMIT_NOFILE {limit}; {len(held)} idle app connections held 3 s, then closed"
    )


def _config(**overrides: Any) -> Callable[[Environment], dict[str, Any]]:
    return lambda env: env.config(**overrides)


_SHORT_AS = {"authorization_server": {"timeout": 2.0}}

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("steady", "Steady load, no fault (the smoke run)", "none", steady),
    Scenario(
        "x509_rotation",
        "X.509-SVID rotation under load (mTLS client auth)",
        "rotate x 10",
        x509_rotation,
        config=_config(authorization_server={"client_auth": "mtls"}),
    ),
    Scenario(
        "jwt_rotation",
        "JWT-SVID signing-key rotation under load",
        "rotate x 6",
        jwt_rotation,
        stack={"token_ttl": 3, "jwt_ttl": 4.0},
    ),
    Scenario(
        "reload_churn",
        "ConfigMap swaps and invalid configs under load",
        "reload x 40",
        reload_churn,
        config_map=True,
    ),
    Scenario(
        "svid_expiry",
        "Workload API down past the X.509-SVID's expiry",
        "refuse 12 s (unix)",
        svid_expiry,
        stack={"token_ttl": 4, "x509_ttl": 6.0},
        config=_config(authorization_server={"client_auth": "mtls"}),
    ),
    Scenario(
        "as_refused",
        "Authorization server refuses connections",
        "refuse 20 s",
        as_refused,
        stack={"token_ttl": 4},
        config=_config(**_SHORT_AS),
    ),
    Scenario(
        "as_slow",
        "Authorization server answers late",
        "delay 2 s, 12 s",
        as_slow,
        stack={"token_ttl": 4},
        config=_config(authorization_server={"timeout": 5.0}),
    ),
    Scenario(
        "as_hung",
        "Authorization server accepts and never answers",
        "stall 12 s",
        as_hung,
        stack={"token_ttl": 4},
        config=_config(authorization_server={"timeout": 10.0}),
    ),
    Scenario(
        "as_garbage",
        "Authorization server answers random bytes",
        "garbage 8 s",
        as_garbage,
        stack={"token_ttl": 4},
        config=_config(**_SHORT_AS),
    ),
    Scenario("upstream_stall", "Upstream accepts and never answers", "stall 12 s", upstream_stall),
    Scenario(
        "upstream_trickle",
        "Upstream answers one byte per 0.5 s",
        "trickle 8 s",
        upstream_trickle,
    ),
    Scenario("upstream_reset", "Upstream resets every connection", "RST 6 s", upstream_reset),
    Scenario(
        "sigterm_drain",
        "SIGTERM under load (upstream 0.3 s slow)",
        "SIGTERM",
        sigterm_drain,
        rate=20.0,  # below the slow upstream's capacity (16 connections / 0.3 s): no queue
    ),
    Scenario(
        "worker_crash", "--workers 2, one worker SIGKILLed", "SIGKILL", worker_crash, workers=2
    ),
    Scenario(
        "fd_exhaustion",
        "File-descriptor limit reached (RLIMIT_NOFILE 128)",
        "EMFILE 3 s",
        fd_exhaustion,
        nofile=128,
        rate=20.0,
    ),
)


async def run_scenario(scenario: Scenario, work: Path, *, scale: float = 1.0) -> Result:
    result = Result(scenario.name, scenario.title, scenario.fault)
    result.known = EXPECTED_FAILURES.get(scenario.name)
    directory = work / scenario.name
    try:
        async with environment(directory, **scenario.stack) as env:
            doc = scenario.config(env)
            config_path = None
            docs: list[dict[str, Any]] = []
            config_map = None
            if scenario.config_map:
                docs = _reload_docs(env)
                doc = docs[0]
                config_map = ConfigMap(directory / "configmap")
                config_map.publish(doc)
                config_path = config_map.path
            sidecar = SidecarProcess(
                env, doc, name="sidecar", workers=scenario.workers, nofile=scenario.nofile,
                config_path=config_path,
            )  # fmt: skip
            async with sidecar:
                # Warm-up: pools and caches filled before the baseline is read.
                await LoadGenerator(*sidecar.listen, rate=scenario.rate).run(1.0)
                run = Run(env, sidecar, result, scenario.rate)
                run.max_connections = int(doc["destinations"][0]["max_connections"])
                run.reload_docs, run.config_map = docs, config_map
                result.fds_before = sidecar.fds()
                result.pooled_before = sidecar.connections_to(env.upstream.port)
                result.rss_before = sidecar.rss_mb()
                await scenario.body(run, scale)
    except Exception as exc:  # a scenario that cannot run is a failed scenario, reported
        result.error = f"{type(exc).__name__}: {exc}"[:500]
    return result
