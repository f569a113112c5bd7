"""The walking skeleton, end to end through real components on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json

import jwt

from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, LogCapture


async def test_get_reaches_upstream_with_a_dpop_bound_token(
    stack: DevStack, sidecar: Sidecar, app: AppClient
) -> None:
    status, _, body = await app.request("GET", f"http://{SAAS_HOST}/v1/invoices?limit=2")
    assert status == 200, body
    seen = stack.saas.requests[-1]
    assert seen.raw_path == "/v1/invoices?limit=2"
    claims = seen.token_claims
    proof = seen.proof_claims
    assert claims is not None
    assert proof is not None
    assert claims["sub"] == stack.spiffe_id
    assert claims["cnf"]["jkt"] == sidecar.dpop_key.thumbprint
    assert claims["scope"] == "invoices:read"
    assert proof["htm"] == "GET"
    assert proof["htu"] == f"{stack.saas.base_url}/v1/invoices"
    assert "ath" in proof
    authz = dict(seen.headers)["Authorization"]
    assert authz.startswith("DPoP ")
    # The token the SaaS saw is the one the AS issued, bound to the sidecar's key.
    assert authz.removeprefix("DPoP ") in stack.auth_server.issued_tokens
    assert (
        jwt.get_unverified_header(dict(seen.headers)["DPoP"])["jwk"] == sidecar.dpop_key.public_jwk
    )


async def test_post_body_arrives_intact_with_write_scope(stack: DevStack, app: AppClient) -> None:
    body = json.dumps({"customer": "ACME", "lines": list(range(500))}).encode()
    status, _, answer = await app.request(
        "POST",
        f"http://{SAAS_HOST}/v1/invoices",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, answer
    seen = stack.saas.requests[-1]
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()
    assert seen.body_len == len(body)
    assert seen.token_claims is not None
    assert seen.token_claims["scope"] == "invoices:write"
    request = stack.auth_server.token_requests[-1]
    assert request.scope == ("invoices:write",)
    assert request.resources == ("https://api.saas.example",)
    assert request.auth_method == "jwt_spiffe" or "spiffe" in request.auth_method


async def test_concurrent_requests_share_one_token_request(stack: DevStack, app: AppClient) -> None:
    results = await asyncio.gather(
        *(app.request("GET", f"http://{SAAS_HOST}/v1/invoices/{i}") for i in range(50))
    )
    assert [status for status, _, _ in results] == [200] * 50
    assert len(stack.auth_server.token_requests) == 1
    assert len(stack.saas.requests) == 50


async def test_unknown_destination_is_denied_and_nothing_is_sent(
    stack: DevStack, app: AppClient
) -> None:
    status, headers, body = await app.request("GET", "http://evil.example/steal")
    assert status == 403
    assert headers["Content-Type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["error"] == "destination_not_allowed"
    assert "evil.example" in doc["detail"]
    assert stack.saas.requests == []
    assert stack.auth_server.token_requests == []


async def test_app_credentials_are_replaced(stack: DevStack, app: AppClient) -> None:
    status, _, _ = await app.request(
        "GET",
        f"http://{SAAS_HOST}/v1/invoices",
        headers={"Authorization": "Bearer static-legacy-secret", "X-Trace": "1"},
    )
    assert status == 200
    sent = stack.saas.requests[-1].headers
    assert [v for k, v in sent if k.lower() == "authorization"] != ["Bearer static-legacy-secret"]
    assert all("static-legacy-secret" not in v for _, v in sent)
    assert ("X-Trace", "1") in sent


async def test_malformed_request_gets_400_and_the_sidecar_keeps_serving(
    stack: DevStack, app: AppClient, logs: LogCapture
) -> None:
    answer = await app.raw(
        b"GET http://api.saas.example/ HTTP/1.1\r\nHost: x\r\nAuthorization Bearer leaked\r\n\r\n"
    )
    assert answer.split(b" ", 2)[1] == b"400"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head
    assert json.loads(body)["error"] == "bad_request"
    assert b"leaked" not in answer
    assert "leaked" not in logs.text()
    answer = await app.raw(b"GET /v1/invoices HTTP/1.1\r\nHost: api.saas.example\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"not_a_proxy_request" in answer
    assert b"HTTP_PROXY" in answer
    status, _, _ = await app.request("GET", f"http://{SAAS_HOST}/v1/invoices")
    assert status == 200
    assert len(stack.saas.requests) == 1


async def test_readiness_follows_the_svid(
    stack: DevStack, sidecar: Sidecar, app: AppClient
) -> None:
    await app.request("GET", f"http://{SAAS_HOST}/v1/invoices")
    ready, problems = sidecar.readiness()
    assert ready, problems
