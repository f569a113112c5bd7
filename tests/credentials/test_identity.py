"""Identity: the real ``spiffe`` client against the dev Workload API (real gRPC, unix socket)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.credentials.identity import (
    REWATCH_MAX,
    REWATCH_SHORT_MAX,
    WorkloadIdentity,
    rewatch_delay,
)
from sidecar.devstack.pki import TrustDomain
from sidecar.devstack.workload_api import DevWorkloadApi
from sidecar.errors import IdentityUnavailable
from tests.conftest import LogCapture

SPIFFE_ID = "spiffe://example.org/ns/billing/sa/legacy-invoicer"
AUDIENCE = "https://as.example"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sidecar-id-"))  # short: unix socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(socket_dir: Path) -> Iterator[DevWorkloadApi]:
    api = DevWorkloadApi(TrustDomain("example.org"), SPIFFE_ID, socket_dir / "agent.sock")
    yield api
    api.stop()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def lines(logs: LogCapture, message: str) -> int:
    return sum(1 for r in logs.records if r.getMessage() == message)


async def test_a_late_agent_is_waited_for_with_one_log_line_per_state_change(
    agent: DevWorkloadApi, logs: LogCapture
) -> None:
    identity = WorkloadIdentity(agent.address, timeout=2.0)
    try:
        # The socket does not exist yet (the agent's volume is mounted but it has not started).
        with pytest.raises(IdentityUnavailable):
            await identity.jwt_svid(AUDIENCE)
        assert identity.state == "waiting"
        waiting = asyncio.create_task(identity.wait_until_ready(AUDIENCE, max_delay=0.2))
        agent.set_available(False)
        agent.start()  # now it answers, but refuses (the workload is not attested yet)
        assert await asyncio.to_thread(agent.wait_refused, 3)
        assert not waiting.done()
        assert identity.state == "waiting"
        assert identity.last_error is not None

        agent.set_available(True)
        await asyncio.wait_for(waiting, 10)
        assert identity.state == "ready"
        assert identity.spiffe_id == SPIFFE_ID
    finally:
        await identity.close()
    # Many attempts, two lines: one when it started waiting, one when the SVID arrived.
    assert lines(logs, "waiting for the SPIFFE Workload API") == 1
    assert lines(logs, "SVID received") == 1


async def test_errors_from_the_spiffe_package_become_identity_unavailable(
    agent: DevWorkloadApi,
) -> None:
    identity = WorkloadIdentity(agent.address, timeout=2.0)
    try:
        with pytest.raises(IdentityUnavailable, match="SPIRE agent"):
            await identity.jwt_svid(AUDIENCE)  # no socket at all
        agent.set_available(False)
        agent.start()
        with pytest.raises(IdentityUnavailable, match="did not issue a JWT-SVID"):
            await identity.jwt_svid(AUDIENCE)
        with pytest.raises(IdentityUnavailable, match=r"X\.509-SVID"):
            await identity.x509_svid(timeout=1.0)
    finally:
        await identity.close()


async def test_jwt_svids_are_cached_per_audience_and_refreshed_at_half_life(
    agent: DevWorkloadApi,
) -> None:
    agent.start()
    clock = Clock()
    identity = WorkloadIdentity(agent.address, clock=clock)
    try:
        first = await identity.jwt_svid(AUDIENCE)
        assert await identity.jwt_svid(AUDIENCE) is first  # cached
        other = await identity.jwt_svid("https://other-as.example")
        assert other.audience == "https://other-as.example"
        assert agent.jwt_svid_requests == [(AUDIENCE,), ("https://other-as.example",)]

        clock.now = first.refresh_at + 1  # past half of the 5-minute lifetime
        assert await identity.jwt_svid(AUDIENCE) is first  # still valid: no caller waits
        await identity.settle()
        renewed = await identity.jwt_svid(AUDIENCE)
        assert renewed is not first
        assert agent.jwt_svid_requests[-1] == (AUDIENCE,)
        assert len(agent.jwt_svid_requests) == 3
    finally:
        await identity.close()


async def test_concurrent_callers_share_one_jwt_svid_fetch(agent: DevWorkloadApi) -> None:
    agent.start()
    identity = WorkloadIdentity(agent.address)
    try:
        svids = await asyncio.gather(*(identity.jwt_svid(AUDIENCE) for _ in range(50)))
        assert len({id(s) for s in svids}) == 1
        assert agent.jwt_svid_requests == [(AUDIENCE,)]
    finally:
        await identity.close()


async def test_svid_repr_and_logs_hold_no_token(agent: DevWorkloadApi, logs: LogCapture) -> None:
    agent.start()
    identity = WorkloadIdentity(agent.address)
    try:
        svid = await identity.jwt_svid(AUDIENCE)
        material = await identity.x509_svid()
    finally:
        await identity.close()
    (token,) = agent.jwt_svids_issued
    assert token not in repr(svid)
    assert "PRIVATE" not in repr(material)
    assert token not in logs.text()


async def _until(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Until ``predicate`` holds (the gRPC stream runs on a thread); bounded."""
    async with asyncio.timeout(seconds):
        # The state is set from the gRPC stream's thread (via the loop): no event to await.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_an_expired_x509_svid_is_never_presented_and_the_break_is_reported_at_once(
    agent: DevWorkloadApi, logs: LogCapture
) -> None:
    agent.start()
    clock = Clock()
    identity = WorkloadIdentity(agent.address, clock=clock, timeout=2.0)
    try:
        material = await identity.x509_svid()
        assert identity.problem(need_x509=True) is None
        agent.set_available(False)  # the agent goes away: the stream breaks now
        await _until(lambda: identity.events["stream_broken"] == 1)
        assert lines(logs, "Workload API stream broken; reconnecting") == 1
        assert identity.x509 is material  # still valid: still presented
        clock.now = material.expires_at  # its notAfter, the agent still gone
        assert identity.x509 is None
        assert identity.held_x509 is material  # what is held (the gauge reports it)
        for _ in range(3):
            with pytest.raises(IdentityUnavailable) as info:
                await identity.x509_svid()
            assert info.value.retry_after is not None
            assert info.value.status == 503
        problem = identity.problem(need_x509=True)
        assert problem is not None
        assert problem[0] == "expired"
        assert "expired" in problem[1]
        assert lines(logs, "X.509-SVID expired; not presenting it") == 1  # once, not per call
        assert identity.events["svid_expired"] == 1
        await _until(lambda: identity.events["reconnect_attempt"] >= 1)
        assert lines(logs, "Workload API stream broken; reconnecting") == 1  # no log per retry

        clock.now = time.time()
        agent.set_available(True)
        fresh = agent.rotate_x509()
        await _until(lambda: identity.x509 is not None and identity.x509 is not material)
        assert identity.problem(need_x509=True) is None
        assert fresh is not None
    finally:
        await identity.close()


async def test_an_expired_jwt_svid_is_never_presented(agent: DevWorkloadApi) -> None:
    agent.start()
    clock = Clock()
    identity = WorkloadIdentity(agent.address, clock=clock, timeout=2.0)
    try:
        first = await identity.jwt_svid(AUDIENCE)
        agent.set_available(False)
        clock.now = first.expires_at
        with pytest.raises(IdentityUnavailable) as info:
            await identity.jwt_svid(AUDIENCE)
        assert info.value.retry_after is not None
        assert identity.events["fetch_failed"] == 1
        assert identity.problem(need_x509=False) is not None
    finally:
        await identity.close()


def test_stream_reconnects_back_off_briefly_while_no_usable_svid_is_held() -> None:
    """Without a usable X.509-SVID (expired during an agent outage) reconnects stay within a
    couple of seconds, so the sidecar recovers soon after the agent returns (chaos:
    svid_expiry); while one is held they back off to 30 s."""
    delay = 0.5
    for _ in range(20):
        delay = rewatch_delay(delay, holding_usable=False)
        assert delay <= REWATCH_SHORT_MAX
    assert delay == REWATCH_SHORT_MAX
    held = 0.5
    for _ in range(20):
        held = rewatch_delay(held, holding_usable=True)
    assert held == REWATCH_MAX
    assert rewatch_delay(REWATCH_MAX, holding_usable=False) == REWATCH_SHORT_MAX
