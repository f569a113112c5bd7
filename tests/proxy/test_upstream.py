"""The data path against strict resource servers: nonces, token rejection, hygiene, streaming."""

from __future__ import annotations

import hashlib
import json
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.devstack.stack import SAAS_HOST, DevStack, dev_stack
from tests.conftest import AppClient, LogCapture, assert_no_secrets, running_sidecar

URL = f"http://{SAAS_HOST}/v1/invoices"


@pytest.fixture
async def strict(tmp_path: Path, logs: LogCapture) -> AsyncIterator[DevStack]:
    """A resource server that demands its own DPoP nonce (and, as always, rejects reused jti)."""
    async with dev_stack(tmp_path, saas={"require_nonce": True}) as running:
        yield running
        assert_no_secrets(logs.text(), running.secrets())


@pytest.fixture
async def strict_app(strict: DevStack) -> AsyncIterator[AppClient]:
    async with running_sidecar(strict) as sidecar, AppClient(sidecar) as client:
        yield client


def statuses(stack: DevStack) -> list[int]:
    return [seen.status for seen in stack.saas.requests]


async def test_rs_nonce_is_learnt_and_retried_once_for_get(
    strict: DevStack, strict_app: AppClient
) -> None:
    status, _, body = await strict_app.request("GET", URL)
    assert status == 200, body
    assert statuses(strict) == [401, 200]
    assert strict.saas.requests[0].error == "use_dpop_nonce"
    first, second = (seen.headers for seen in strict.saas.requests)
    assert dict(first)["DPoP"] != dict(second)["DPoP"]  # a new proof, not a replay
    assert strict.saas.requests[1].proof_claims is not None
    assert strict.saas.requests[1].proof_claims["nonce"] == strict.saas.proofs.nonce
    # The nonce is remembered for the origin: the next request needs no retry.
    status, _, _ = await strict_app.request("GET", URL)
    assert status == 200
    assert statuses(strict) == [401, 200, 200]


async def test_rs_nonce_retry_resends_a_small_post_body_intact(
    strict: DevStack, strict_app: AppClient
) -> None:
    body = json.dumps({"amount": 42, "pad": "x" * 2000}).encode()
    status, _, answer = await strict_app.request("POST", URL, data=body)
    assert status == 200, answer
    assert statuses(strict) == [401, 200]
    digest = hashlib.sha256(body).hexdigest()
    assert [seen.body_sha256 for seen in strict.saas.requests] == [digest, digest]


async def test_streaming_post_is_not_retried_and_the_401_reaches_the_app(
    strict: DevStack, strict_app: AppClient
) -> None:
    async def five_megabytes() -> AsyncIterator[bytes]:
        for _ in range(80):
            yield b"s" * 65536

    status, headers, answer = await strict_app.request("POST", URL, data=five_megabytes())
    assert status == 401
    assert 'error="use_dpop_nonce"' in headers["WWW-Authenticate"]
    assert json.loads(answer)["error"] == "use_dpop_nonce"
    assert statuses(strict) == [401]
    assert strict.saas.requests[0].body_len == 80 * 65536


async def test_invalid_token_leads_to_exactly_one_new_token(
    stack: DevStack, app: AppClient
) -> None:
    assert (await app.request("GET", URL))[0] == 200
    first = stack.saas.requests[-1].token_claims
    assert first is not None
    stack.saas.revoked.add(first["jti"])
    status, _, body = await app.request("GET", URL)
    assert status == 200, body
    assert len(stack.auth_server.token_requests) == 2
    assert statuses(stack) == [200, 401, 200]
    renewed = stack.saas.requests[-1].token_claims
    assert renewed is not None
    assert renewed["jti"] != first["jti"]


async def test_a_second_rejection_is_passed_back_not_looped(
    stack: DevStack, app: AppClient
) -> None:
    assert (await app.request("GET", URL))[0] == 200
    stack.saas.reject_all_tokens = True  # the new token is rejected as well
    status, headers, _ = await app.request("GET", URL)
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert statuses(stack) == [200, 401, 401]
    assert len(stack.auth_server.token_requests) == 2


async def test_hop_by_hop_and_app_credentials_never_reach_upstream(
    stack: DevStack, app: AppClient
) -> None:
    status, _, body = await app.request(
        "GET",
        f"http://{SAAS_HOST}/headers",
        headers={
            "Connection": "keep-alive, X-Private-Hop",
            "X-Private-Hop": "hop-secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "Proxy-Foo": "bar",
            "Authorization": "Bearer app-static-secret",
            "DPoP": "app-proof",
            "X-Repeated": "one",
            "X-Keep": "kept",
        },
    )
    assert status == 200, body
    seen = stack.saas.requests[-1].headers
    names = [name.lower() for name, _ in seen]
    for hop in ("x-private-hop", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-foo"):
        assert hop not in names
    assert all("secret" not in value and value != "app-proof" for _, value in seen)
    assert names.count("authorization") == 1
    assert names.count("dpop") == 1
    assert ("X-Keep", "kept") in seen
    assert dict(seen)["Host"] == stack.saas.base_url.removeprefix("https://")


async def test_repeated_headers_keep_their_order(stack: DevStack, app: AppClient) -> None:
    raw = (
        f"GET http://{SAAS_HOST}/headers HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"
        "X-Multi: 1\r\nX-Other: a\r\nX-Multi: 2\r\nX-Multi: 3\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = await app.raw(raw)
    assert answer.startswith(b"HTTP/1.1 200")
    seen = stack.saas.requests[-1].headers
    assert [v for k, v in seen if k == "X-Multi"] == ["1", "2", "3"]


async def test_response_hop_by_hop_headers_are_removed(stack: DevStack, app: AppClient) -> None:
    status, headers, _ = await app.request("GET", URL)
    assert status == 200
    assert "Keep-Alive" not in headers
    assert "Proxy-Authenticate" not in headers


async def test_a_route_can_refuse_app_credentials(stack: DevStack) -> None:
    async with (
        running_sidecar(stack, destination={"app_credentials": "refuse"}) as sidecar,
        AppClient(sidecar) as app,
    ):
        status, _, body = await app.request("GET", URL, headers={"Authorization": "Bearer x"})
        assert status == 400
        assert "Authorization" in json.loads(body)["detail"]
        assert stack.saas.requests == []
        assert (await app.request("GET", URL))[0] == 200


async def test_via_header_when_configured(stack: DevStack) -> None:
    async with (
        running_sidecar(stack, destination={"via": True}) as sidecar,
        AppClient(sidecar) as app,
    ):
        assert (await app.request("GET", URL))[0] == 200
    assert dict(stack.saas.requests[-1].headers)["Via"] == "1.1 spiffe-oauth-sidecar"


async def test_no_scope_rule_and_no_default_is_403_naming_the_route(stack: DevStack) -> None:
    overrides = {"scopes": {"rules": [{"methods": ["GET"], "paths": ["/v1/**"], "scopes": ["r"]}]}}
    async with (
        running_sidecar(stack, destination=overrides) as sidecar,
        AppClient(sidecar) as app,
    ):
        status, _, body = await app.request("GET", f"http://{SAAS_HOST}/v2/other")
    assert status == 403
    doc = json.loads(body)
    assert doc["error"] == "no_scope_rule"
    assert doc["route"] == "saas"
    assert stack.auth_server.token_requests == []
    assert stack.saas.requests == []


async def test_each_scope_set_gets_its_own_token(stack: DevStack, app: AppClient) -> None:
    assert (await app.request("GET", URL))[0] == 200
    assert (await app.request("POST", f"{URL}/7", data=b"{}"))[0] == 200
    assert (await app.request("GET", f"{URL}/8"))[0] == 200
    assert [r.scope for r in stack.auth_server.token_requests] == [
        ("invoices:read",),
        ("invoices:write",),
    ]


async def test_read_timeout_is_a_clear_504(stack: DevStack) -> None:
    async with (
        running_sidecar(stack, destination={"read_timeout": 0.2}) as sidecar,
        AppClient(sidecar) as app,
    ):
        status, _, body = await app.request("GET", f"http://{SAAS_HOST}/hang")
    assert status == 504
    assert json.loads(body)["error"] == "upstream_timeout"


async def test_loopback_upstream_is_refused_without_allow_private(stack: DevStack) -> None:
    async with (
        running_sidecar(stack, destination={"allow_private": False}) as sidecar,
        AppClient(sidecar) as app,
    ):
        status, _, body = await app.request("GET", URL)
        assert status == 403
        assert "allow_private" in json.loads(body)["detail"]
        named = stack.saas.base_url.replace("127.0.0.1", "localhost")
    async with (
        running_sidecar(stack, destination={"allow_private": False, "upstream": named}) as sc,
        AppClient(sc) as app,
    ):
        status, _, body = await app.request("GET", URL)
        assert status == 403, body  # a name that resolves to loopback is refused as well
    assert stack.saas.requests == []


async def test_large_download_streams_with_bounded_memory(stack: DevStack, app: AppClient) -> None:
    size = 100 * 1024 * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    received = 0
    digest = hashlib.sha256()
    async with app.session.get(f"http://{SAAS_HOST}/download/{size}", proxy=app.proxy) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(1 << 16):
            received += len(chunk)
            digest.update(chunk)
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(b"\x5a" * size).hexdigest()
    # Sidecar, dev SaaS API and app all live in this process: the bound covers all three.
    assert growth_mib < 50, f"peak RSS grew by {growth_mib:.0f} MiB"


async def test_chunked_upload_of_unknown_length_is_streamed(
    stack: DevStack, app: AppClient
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(40):
            yield bytes([i]) * 100_000

    expected = hashlib.sha256(b"".join(bytes([i]) * 100_000 for i in range(40))).hexdigest()
    status, _, body = await app.request("POST", URL, data=chunks())
    assert status == 200, body
    assert stack.saas.requests[-1].body_sha256 == expected
