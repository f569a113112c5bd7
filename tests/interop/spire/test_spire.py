"""The sidecar against a real SPIRE agent instead of the suite's own Workload API.

The dev authorization server and the SaaS API are the same as everywhere in the suite; only
the identity comes from SPIRE (v1.13, built from the Go module proxy by `make spire`): the
X.509-SVID stream, JWT-SVIDs verified against SPIRE's JWT bundle, X.509 rotation with a short
TTL, and the agent restarting under the running sidecar.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sidecar.devstack.stack import SPIFFE_ID, DevStack
from sidecar.runtime import Sidecar
from tests.conftest import (
    AppClient,
    LogCapture,
    ManualClock,
    assert_no_secrets,
    running_sidecar,
)
from tests.interop.peers import URL
from tests.interop.spire.spire import Spire, spire

ROTATION_TIMEOUT = 120.0  # the agent rotates at about half the TTL; bounded, event-driven wait


@pytest.fixture
async def agent(stack: DevStack, logs: LogCapture) -> AsyncIterator[Spire]:
    """SPIRE with this process registered; the dev AS trusts SPIRE's keys instead of the dev
    trust domain's (and accepts SPIRE's X.509-SVIDs as TLS client certificates)."""
    async with spire() as running:
        await running.register(SPIFFE_ID, x509_ttl=30)
        await running.until_issued(stack.auth_server.issuer)
        jwks = await running.jwt_bundle()
        # The dev AS's seams: which JWT keys it trusts, which CA signs client certificates.
        stack.auth_server._trust_jwks = lambda: jwks
        context: ssl.SSLContext = stack.auth_server._ssl
        context.load_verify_locations(cadata=await running.x509_bundle_pem())
        yield running
        # SPIRE's JWT-SVID (the sidecar's client assertion) never reached a log either.
        assert_no_secrets(logs.text(), [await running.jwt_svid(stack.auth_server.issuer)])


def on_spire(agent: Spire, **server: Any) -> dict[str, Any]:
    return {"spiffe": {"socket": agent.workload_api}, "authorization_server": server}


def rotations(sidecar: Sidecar) -> asyncio.Queue[str]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    sidecar.identity.on_x509_rotation(lambda material: queue.put_nowait(material.fingerprint))
    return queue


async def test_jwt_svid_from_spire_gets_a_token(stack: DevStack, agent: Spire) -> None:
    async with running_sidecar(stack, **on_spire(agent)) as sidecar, AppClient(sidecar) as app:
        status, _, body = await app.request("GET", URL)
        assert status == 200, body
        status, _, body = await app.request("POST", URL, data=b"{}")
        assert status == 200, body
    records = stack.auth_server.token_requests
    assert [(r.status, r.auth_method, r.client_id) for r in records] == [
        (200, "jwt_spiffe", SPIFFE_ID)
    ] * 2
    assert stack.workload_api.jwt_svid_requests == []  # the dev Workload API was not asked
    claims = stack.saas.requests[-1].token_claims
    assert claims is not None
    assert claims["sub"] == SPIFFE_ID


async def test_x509_svid_from_spire_for_mtls_and_its_rotation(
    stack: DevStack, agent: Spire
) -> None:
    settings = on_spire(agent, client_auth="mtls")
    clock = ManualClock()  # token lifetimes only: SVID validity is read on the wall clock
    async with (
        running_sidecar(stack, clock=clock, **settings) as sidecar,
        AppClient(sidecar) as app,
    ):
        rotated = rotations(sidecar)
        status, _, body = await app.request("GET", URL)
        assert status == 200, body
        first = sidecar.identity.x509
        assert first is not None
        assert first.spiffe_id == SPIFFE_ID
        new = await asyncio.wait_for(rotated.get(), ROTATION_TIMEOUT)  # a 30 s TTL rotates
        assert new != first.fingerprint
        status, _, body = await app.request("GET", URL)
        assert status == 200, body
        # A rotation costs no token request (tokens are DPoP-bound, not certificate-bound).
        assert len([r for r in stack.auth_server.token_requests if r.status == 200]) == 1
        clock.advance(250)  # past the refresh point of a 300 s token: the next renewal
        status, _, body = await app.request("GET", URL)
        assert status == 200, body
        await sidecar.credentials.cache.settle()
    records = [r for r in stack.auth_server.token_requests if r.status == 200]
    assert [r.auth_method for r in records] == ["tls_client_auth"] * 2
    # The renewal was asked for with the rotated certificate, not the first one.
    assert [r.client_cert_sha256 for r in records] == [first.fingerprint, new]


async def test_the_sidecar_recovers_when_the_agent_restarts(stack: DevStack, agent: Spire) -> None:
    settings = on_spire(agent, client_auth="mtls")
    async with running_sidecar(stack, **settings) as sidecar, AppClient(sidecar) as app:
        rotated = rotations(sidecar)
        status, _, body = await app.request("GET", URL)
        assert status == 200, body
        await agent.stop_agent()
        await agent.start_agent()
        # The X.509 stream broke with the agent; the sidecar re-watches the new agent and gets
        # its next rotation over the new stream.
        fingerprint = await asyncio.wait_for(rotated.get(), ROTATION_TIMEOUT)
        status, _, body = await app.request("POST", URL, data=b"{}")  # a new token, new cert
        assert status == 200, body
    assert agent.agent_starts == 2
    last = stack.auth_server.token_requests[-1]
    assert (last.status, last.client_cert_sha256) == (200, fingerprint)
