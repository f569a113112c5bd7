"""The credential broker end to end: every client auth and grant against the strict dev AS,
X.509-SVID rotation, AS outages and the refresh policy, through the real sidecar."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.devstack.auth_server import JWT_BEARER_GRANT, TOKEN_EXCHANGE
from sidecar.devstack.stack import SAAS_HOST, DevStack, dev_stack
from tests.conftest import AppClient, LogCapture, ManualClock, assert_no_secrets, running_sidecar

URL = f"http://{SAAS_HOST}/v1/invoices"


@pytest.fixture
async def stack_with(tmp_path: Path, logs: LogCapture) -> AsyncIterator[Any]:
    """Build a dev stack with custom AS options; secrets are checked against the logs after."""
    stacks: list[DevStack] = []

    async def make(**auth_server: Any) -> DevStack:
        cm = dev_stack(tmp_path, auth_server=auth_server)
        stack = await cm.__aenter__()
        stacks.append(stack)
        exits.append(cm)
        return stack

    exits: list[Any] = []
    yield make
    for cm in reversed(exits):
        await cm.__aexit__(None, None, None)
    for stack in stacks:
        assert_no_secrets(logs.text(), stack.secrets())


async def get(stack: DevStack, **overrides: Any) -> tuple[int, bytes]:
    async with running_sidecar(stack, **overrides) as sidecar, AppClient(sidecar) as app:
        status, _, body = await app.request("GET", URL)
    return status, body


async def test_jwt_bearer_client_assertion(stack: DevStack) -> None:
    status, body = await get(stack, authorization_server={"client_auth": "jwt_bearer"})
    assert status == 200, body
    record = stack.auth_server.token_requests[-1]
    assert record.auth_method == "jwt_bearer"
    assert record.client_id == stack.spiffe_id
    assert stack.workload_api.jwt_svid_requests[-1] == (stack.auth_server.issuer,)


async def test_svid_audience_can_be_the_token_endpoint(stack: DevStack) -> None:
    endpoint = stack.auth_server.token_endpoint
    status, body = await get(stack, authorization_server={"svid_audience": endpoint})
    assert status == 200, body
    assert (endpoint,) in stack.workload_api.jwt_svid_requests


async def test_client_secret_from_a_file_is_reread_when_it_changes(
    stack_with: Any, tmp_path: Path, logs: LogCapture
) -> None:
    stack = await stack_with(client_secrets={"legacy-app": "first-secret-value-123"})
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("first-secret-value-123\n")
    server = {
        "client_auth": "client_secret",
        "client_id": "legacy-app",
        "client_secret_file": str(secret_file),
    }
    async with (
        running_sidecar(stack, authorization_server=server) as sidecar,
        AppClient(sidecar) as app,
    ):
        assert (await app.request("GET", URL))[0] == 200
        # The secret is rotated (a Kubernetes Secret update): the file changes.
        stack.auth_server.client_secrets["legacy-app"] = "second-secret-value-456"
        secret_file.write_text("second-secret-value-456 ")
        status, _, body = await app.request("POST", f"{URL}/1", data=b"{}")  # new scope set
        assert status == 200, body
    methods = [(r.auth_method, r.client_id, r.status) for r in stack.auth_server.token_requests]
    assert methods == [("client_secret_basic", "legacy-app", 200)] * 2
    assert "secret-value" not in logs.text()


async def test_token_exchange_sends_the_svid_as_subject_token(stack_with: Any) -> None:
    stack = await stack_with()
    stack.auth_server.public_clients.add("exchange-client")
    server = {
        "grant": "token_exchange",
        "client_auth": "none",
        "client_id": "exchange-client",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
    }
    status, body = await get(stack, authorization_server=server, destination={"audience": "saas"})
    assert status == 200, body
    record = stack.auth_server.token_requests[-1]
    assert record.grant_type == TOKEN_EXCHANGE
    assert record.params["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    assert record.params["requested_token_type"].endswith(":access_token")
    assert record.resources == ("https://api.saas.example",)
    assert record.audiences == ("saas",)
    assert "subject_token" not in record.params  # the dev AS never records credentials
    claims = stack.saas.requests[-1].token_claims
    assert claims is not None
    assert claims["sub"] == stack.spiffe_id  # the subject is the workload, proven by its SVID


async def test_jwt_bearer_grant_uses_the_svid_as_assertion(stack_with: Any) -> None:
    stack = await stack_with()
    stack.auth_server.public_clients.add("grant-client")
    server = {"grant": "jwt_bearer", "client_auth": "none", "client_id": "grant-client"}
    status, body = await get(stack, authorization_server=server)
    assert status == 200, body
    assert stack.auth_server.token_requests[-1].grant_type == JWT_BEARER_GRANT


async def test_mtls_client_auth_and_x509_rotation_without_a_failed_request(
    stack: DevStack,
) -> None:
    """A rotation neither fails nor holds a request, and costs no token request: the token is
    bound to the DPoP key, not to the certificate. The next renewal presents the new one."""
    clock = ManualClock()
    server = {"client_auth": "mtls"}
    async with running_sidecar(stack, clock=clock, authorization_server=server) as sidecar:
        rotated = asyncio.Event()
        sidecar.identity.on_x509_rotation(lambda _: rotated.set())
        async with AppClient(sidecar) as app:
            first = await asyncio.gather(*(app.request("GET", URL) for _ in range(10)))
            token = _jti(stack)
            old = stack.workload_api.x509_svid
            new = stack.workload_api.rotate_x509()
            await asyncio.wait_for(rotated.wait(), 10)
            second = await asyncio.gather(*(app.request("GET", URL) for _ in range(10)))
            assert len(stack.auth_server.token_requests) == 1  # nothing fetched on rotation
            assert _jti(stack) == token  # the token held was served, no request waited
            clock.advance(250)  # past the refresh point of a 300 s token, before its expiry
            assert (await app.request("GET", URL))[0] == 200  # starts the renewal
            await sidecar.credentials.cache.settle()
            assert (await app.request("GET", URL))[0] == 200
            assert _jti(stack) != token
            # With the orphaned old-certificate key gone, the timer renews nothing else.
            assert len(sidecar.credentials.cache) == 1
    assert [s for s, _, _ in first + second] == [200] * 20
    records = stack.auth_server.token_requests
    assert [(r.auth_method, r.client_id) for r in records] == [
        ("tls_client_auth", stack.spiffe_id)
    ] * 2
    fingerprints = [r.client_cert_sha256 for r in records]
    assert fingerprints == [_sha256(old.chain_der), _sha256(new.chain_der)]


def _sha256(der: bytes) -> str:
    import hashlib

    return hashlib.sha256(der).hexdigest()


async def test_as_nonce_is_retried_once_with_a_fresh_proof(stack_with: Any) -> None:
    stack = await stack_with(require_nonce=True)
    status, body = await get(stack)
    assert status == 200, body
    assert [(r.status, r.error) for r in stack.auth_server.token_requests] == [
        (400, "use_dpop_nonce"),
        (200, None),
    ]


async def test_a_bearer_answer_on_a_dpop_route_fails_closed(stack_with: Any) -> None:
    stack = await stack_with(issue_bearer=True)
    status, body = await get(stack)
    assert status == 502
    doc = json.loads(body)
    assert doc["error"] == "token_request_rejected"
    assert "Bearer" in doc["detail"]
    assert stack.saas.requests == []


async def test_as_client_errors_are_passed_through_without_a_retry_loop(
    stack_with: Any,
) -> None:
    stack = await stack_with(allowed_scopes={"other:scope"})
    async with running_sidecar(stack) as sidecar, AppClient(sidecar) as app:
        answers = [await app.request("GET", URL) for _ in range(3)]
    for status, _, body in answers:
        assert status == 502
        doc = json.loads(body)
        assert doc["route"] == "saas"
        assert doc["authorization_server_error"].startswith("invalid_scope")
    assert len(stack.auth_server.token_requests) == 1  # backed off: no hot loop
    assert stack.saas.requests == []


async def test_100_concurrent_callers_on_a_cold_cache_cause_one_token_request(
    stack: DevStack, app: AppClient
) -> None:
    results = await asyncio.gather(*(app.request("GET", f"{URL}/{i}") for i in range(100)))
    assert {status for status, _, _ in results} == {200}
    assert len(stack.auth_server.token_requests) == 1


async def test_refresh_ahead_renews_without_a_request_waiting(stack: DevStack) -> None:
    clock = ManualClock()
    async with running_sidecar(stack, clock=clock) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        first = _jti(stack)
        clock.advance(250)  # past the refresh point of a 300 s token, before its expiry
        assert (await app.request("GET", URL))[0] == 200
        # Served the current token at once: a request that waited would carry the new one.
        assert _jti(stack) == first
        await sidecar.credentials.cache.settle()
        assert stack.auth_server.token_requests[1].status == 200
        assert (await app.request("GET", URL))[0] == 200
        assert _jti(stack) != first
    assert len(stack.auth_server.token_requests) == 2


async def test_as_down_with_a_valid_token_keeps_serving(stack: DevStack) -> None:
    clock = ManualClock()
    async with running_sidecar(stack, clock=clock) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        stack.auth_server.set_down(True)
        clock.advance(250)
        assert (await app.request("GET", URL))[0] == 200  # starts a refresh, which fails
        await sidecar.credentials.cache.settle()
        assert stack.auth_server.token_requests[1].status == 503
        for _ in range(5):
            clock.advance(5)
            assert (await app.request("GET", URL))[0] == 200
    assert {seen.status for seen in stack.saas.requests} == {200}


async def test_as_down_after_expiry_is_503_with_retry_after_and_nothing_sent(
    stack: DevStack,
) -> None:
    clock = ManualClock()
    async with running_sidecar(stack, clock=clock) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        stack.auth_server.set_down(True)
        clock.advance(400)  # the 300 s token has expired
        status, headers, body = await app.request("GET", URL)
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    doc = json.loads(body)
    assert doc["error"] == "token_unavailable"
    assert doc["route"] == "saas"
    assert doc["authorization_server_error"].startswith("temporarily_unavailable")
    assert len(stack.saas.requests) == 1  # only the first, successful request


def _jti(stack: DevStack) -> str:
    claims = stack.saas.requests[-1].token_claims
    assert claims is not None
    return str(claims["jti"])


async def test_discovery_prefers_rfc8414_and_caches_the_metadata(stack: DevStack) -> None:
    clock = ManualClock()
    async with running_sidecar(stack, clock=clock) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        assert (await app.request("POST", URL, data=b"{}"))[0] == 200  # a second token
        assert stack.auth_server.metadata_requests == ["/.well-known/oauth-authorization-server"]
        clock.advance(3600 + 1)  # metadata is refreshed hourly (with the next token request)
        assert (await app.request("GET", URL))[0] == 200
    assert len(stack.auth_server.token_requests) == 3
    assert len(stack.auth_server.metadata_requests) == 2


async def test_discovery_falls_back_to_openid_configuration(stack: DevStack) -> None:
    stack.auth_server.rfc8414 = False
    status, body = await get(stack)
    assert status == 200, body
    assert stack.auth_server.metadata_requests == [
        "/.well-known/oauth-authorization-server",
        "/.well-known/openid-configuration",
    ]


async def test_metadata_naming_another_issuer_is_refused(stack: DevStack) -> None:
    stack.auth_server.metadata_issuer = "https://attacker.example"
    status, body = await get(stack)
    assert status == 502
    assert "different issuer" in json.loads(body)["detail"]
    assert stack.auth_server.token_requests == []  # no credential was sent anywhere
    assert stack.saas.requests == []


async def test_an_explicit_token_endpoint_skips_discovery(stack: DevStack) -> None:
    endpoint = stack.auth_server.token_endpoint
    status, body = await get(stack, authorization_server={"token_endpoint": endpoint})
    assert status == 200, body
    assert stack.auth_server.metadata_requests == []
