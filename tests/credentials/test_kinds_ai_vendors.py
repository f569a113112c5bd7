"""AI vendor profile (issue #20.4): OpenAI's workload identity token exchange, as its API
reference documents it (developers.openai.com, "Workload identity token exchange", read
2026-12-02): RFC 8693 at ``/oauth/token`` with a JSON body, ``identity_provider_id`` and
``service_account_id``, the JWT-SVID as a ``jwt`` subject token carrying ``kid``, ``iss``,
``aud``, ``sub``, ``exp`` and ``iat``. A local endpoint on loopback (real TLS) enforces exactly
that; the sidecar's request must pass it and the token reach the API.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web

from sidecar import config
from sidecar.credentials.token_client import TokenKey, encode_form, token_form
from sidecar.devstack.stack import DevStack
from sidecar.errors import ConfigError
from sidecar.ops.checks import explain
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, LogCapture, assert_no_secrets
from tests.credentials.test_kinds_static_header import recording_origin

ISSUER = "https://oidc.spire.example.org"  # SPIRE's jwt_issuer (the OIDC discovery provider)
AUDIENCE = "openai-wif"
IDP = "wip_0123456789abcdef"
ACCOUNT = "svcacct_0123456789abcdef"
HOST = "api.openai.com"
REQUIRED = {"grant_type", "subject_token_type", "subject_token", "identity_provider_id"}
REQUIRED |= {"service_account_id"}


class LocalOpenAI:
    """The exchange endpoint, enforcing what the reference documents."""

    def __init__(self, stack: DevStack) -> None:
        self.jwks = jwt.PyJWKSet.from_dict(stack.trust_domain.jwks())
        self.requests: list[dict[str, Any]] = []
        self.issued: list[str] = []

    def _refuse(self, status: int, why: str) -> web.Response:
        return web.json_response(
            {
                "error": "invalid_request" if status == 400 else "invalid_grant",
                "error_description": why,
            },
            status=status,
        )

    async def handle(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return self._refuse(400, "the body must be JSON")
        body = await request.json()
        self.requests.append(body)
        if not isinstance(body, dict) or not set(body) >= REQUIRED:
            return self._refuse(400, f"missing {sorted(REQUIRED - set(body))}")
        unexpected = set(body) - REQUIRED - {"scope"}
        if unexpected:
            return self._refuse(400, f"unexpected {sorted(unexpected)}")
        if body["grant_type"] != "urn:ietf:params:oauth:grant-type:token-exchange":
            return self._refuse(400, "unsupported grant_type")
        if body["subject_token_type"] not in (
            "urn:ietf:params:oauth:token-type:jwt",
            "urn:ietf:params:oauth:token-type:id_token",
        ):
            return self._refuse(400, "unsupported subject_token_type")
        if (body["identity_provider_id"], body["service_account_id"]) != (IDP, ACCOUNT):
            return self._refuse(401, "no matching service account mapping")
        token = body["subject_token"]
        try:
            header = jwt.get_unverified_header(token)
            key = self.jwks[header["kid"]]
            claims = jwt.decode(
                token,
                key.key,
                algorithms=["ES256", "RS256", "PS256"],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["iss", "aud", "sub", "exp", "iat"]},
            )
        except (jwt.PyJWTError, KeyError) as exc:
            return self._refuse(401, f"subject token verification failed ({type(exc).__name__})")
        access = f"oai-wif-{len(self.issued)}-{claims['sub'].rsplit('/', 1)[-1]}"
        self.issued.append(access)
        return web.json_response(
            {
                "access_token": access,
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "token_type": "Bearer",
                "expires_in": 3600,
            }
        )


@contextlib.asynccontextmanager
async def local_openai(stack: DevStack) -> AsyncIterator[tuple[str, LocalOpenAI]]:
    endpoint = LocalOpenAI(stack)
    app = web.Application()
    app.router.add_post("/oauth/token", endpoint.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tls = stack.ca.issue_server("127.0.0.1", "localhost")
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context())
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/oauth/token", endpoint
    finally:
        await runner.cleanup()


def openai_config(stack: DevStack, token_endpoint: str, upstream: str) -> config.Config:
    """The recipe in config/README.md, pointed at the local endpoints."""
    doc = stack.sidecar_config()
    doc["authorization_servers"] = {
        "openai": {
            "token_endpoint": token_endpoint,
            "ca_file": str(stack.ca_file),
            "grant": "token_exchange",
            "client_auth": "none",
            "dpop": False,
            "svid_audience": AUDIENCE,
            "request_encoding": "json",
            "extra_fields": {"identity_provider_id": IDP, "service_account_id": ACCOUNT},
        }
    }
    doc["destinations"] = [
        {
            "name": "openai",
            "host": HOST,
            "upstream": upstream,
            "authorization_server": "openai",
            "token_type": "bearer",
            "ca_file": str(stack.ca_file),
            "allow_private": True,
            "scopes": {"default": []},  # OpenAI: the mapping's permissions, not scopes
        }
    ]
    return config.parse(doc)


@pytest.fixture
def spire_issuer(stack: DevStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """JWT-SVIDs with an ``iss``, as SPIRE mints them once ``jwt_issuer`` is configured (the
    vendor requires it; the dev trust domain leaves it out, like SPIRE's default)."""
    domain = stack.trust_domain
    plain = domain.issue_jwt_svid

    def with_issuer(spiffe_id: str, audience: Any, ttl: float = 300.0) -> str:
        token = plain(spiffe_id, audience, ttl)
        claims = jwt.decode(token, options={"verify_signature": False})
        kid, key = domain._jwt_keys[-1]
        return jwt.encode(
            {**claims, "iss": ISSUER}, key, algorithm="ES256", headers={"kid": kid, "typ": "JWT"}
        )

    monkeypatch.setattr(domain, "issue_jwt_svid", with_issuer)


async def test_openai_workload_identity_exchange_as_documented(
    stack: DevStack, spire_issuer: None, logs: LogCapture
) -> None:
    async with local_openai(stack) as (endpoint, openai), recording_origin(stack) as (up, seen):
        cfg = openai_config(stack, endpoint, up)
        async with Sidecar(cfg, grace=1.0) as sidecar, AppClient(sidecar) as app:
            for _ in range(2):
                status, _, body = await app.request(
                    "POST",
                    f"http://{HOST}/v1/responses",
                    json={"model": "gpt-5", "input": "hi"},
                    headers={"Authorization": "Bearer sk-placeholder"},
                )
                assert status == 200, body
    (sent,) = openai.requests  # one exchange, cached for both requests
    assert set(sent) == REQUIRED  # exactly the documented fields: no client_id, no scope
    assert sent["identity_provider_id"] == IDP
    assert sent["service_account_id"] == ACCOUNT
    authorization = [dict((k.lower(), v) for k, v in s["headers"])[b"authorization"] for s in seen]
    assert authorization == [f"Bearer {openai.issued[0]}".encode()] * 2
    assert_no_secrets(logs.text(), [*openai.issued, sent["subject_token"]])


async def test_a_jwt_svid_without_iss_is_refused_as_the_vendor_documents(
    stack: DevStack, logs: LogCapture
) -> None:
    """SPIRE's default JWT-SVIDs carry no ``iss``; OpenAI requires one: the app gets a clean
    502 naming the refusal, and nothing reaches the API."""
    async with local_openai(stack) as (endpoint, openai), recording_origin(stack) as (up, seen):
        cfg = openai_config(stack, endpoint, up)
        async with Sidecar(cfg, grace=1.0) as sidecar, AppClient(sidecar) as app:
            status, _, body = await app.request("POST", f"http://{HOST}/v1/responses", json={})
    assert status == 502
    assert json.loads(body)["authorization_server_error"] == "invalid_grant"
    assert seen == []
    assert openai.issued == []


def test_json_requests_send_only_the_configured_fields() -> None:
    cfg = config.parse(
        {
            "spiffe": {"socket": "unix:///tmp/agent.sock"},
            "authorization_servers": {
                "json": {
                    "token_endpoint": "https://vendor.example/oauth/token",
                    "grant": "token_exchange",
                    "client_auth": "none",
                    "request_encoding": "json",
                    "extra_fields": {"identity_provider_id": IDP},
                },
                "form": {
                    "token_endpoint": "https://as.example/token",
                    "grant": "token_exchange",
                    "client_auth": "none",
                },
            },
            "destinations": [
                {"host": "a.example", "authorization_server": "json"},
                {"host": "b.example", "authorization_server": "form"},
            ],
        }
    )
    key = TokenKey("json", "spiffe://example.org/app", "token_exchange", None, None, (), None)
    json_server = cfg.authorization_servers["json"]
    form = token_form(json_server, key, None)
    assert "client_id" not in form
    assert form["identity_provider_id"] == IDP
    body, content_type = encode_form(form, json_server.request_encoding)
    assert content_type == "application/json"
    assert json.loads(body) == form
    # Form-encoded servers keep sending client_id with client_auth none, as before.
    form_server = cfg.authorization_servers["form"]
    plain = token_form(form_server, key, None)
    assert plain["client_id"] == "spiffe://example.org/app"
    body, content_type = encode_form(plain, form_server.request_encoding)
    assert content_type == "application/x-www-form-urlencoded"
    assert b"client_id=spiffe%3A%2F%2Fexample.org%2Fapp" in body


def test_explain_shows_the_encoding_and_vendor_fields(stack: DevStack) -> None:
    cfg = openai_config(stack, "https://127.0.0.1:1/oauth/token", "https://127.0.0.1:2")
    text, _ = explain(cfg, "POST", f"http://{HOST}/v1/responses")
    assert (
        f"request        json, vendor fields identity_provider_id={IDP}, "
        f"service_account_id={ACCOUNT}"
    ) in text


def test_vendor_fields_are_validated() -> None:
    doc = {
        "spiffe": {"socket": "unix:///tmp/agent.sock"},
        "authorization_servers": {
            "v": {
                "token_endpoint": "https://vendor.example/oauth/token",
                "request_encoding": "xml",
                "extra_fields": {"grant_type": "x", "bad name": "x", "n": 3, "ok": ""},
            },
            "aws": {
                "kind": "aws_sts",
                "region": "eu-west-1",
                "role_arn": "arn:aws:iam::123456789012:role/x",
                "request_encoding": "json",
            },
            "w": {"token_endpoint": "https://vendor.example/t", "extra_fields": ["a"]},
        },
        "destinations": [{"host": "a.example", "authorization_server": "v"}],
    }
    with pytest.raises(ConfigError) as info:
        config.parse(doc)
    text = str(info.value)
    for expected in (
        "authorization_servers.v.request_encoding: must be one of form, json",
        "authorization_servers.v.extra_fields.grant_type: grant_type is set by the sidecar",
        "authorization_servers.v.extra_fields.bad name: must be a field name",
        "authorization_servers.v.extra_fields.n: must be a non-empty string",
        "authorization_servers.v.extra_fields.ok: must be a non-empty string",
        "authorization_servers.aws.request_encoding: is not used with kind: aws_sts",
        "authorization_servers.w.extra_fields: must be a mapping",
    ):
        assert expected in text, text
