"""``kind: google_sts``: Google Cloud workload identity federation, checked against Google's own
client. A local STS and IAM Credentials endpoint (real TLS on loopback) enforce what Google
documents and record what arrives; google-auth's identity-pool credentials (the library
Google's SDKs use) and the sidecar are both run against them with the same JWT-SVID, and must
send the same fields and get the same token out of the same answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from aiohttp import web
from google.auth import identity_pool
from google.auth.transport.requests import Request as GoogleRequest

from sidecar import config
from sidecar.credentials import google_sts
from sidecar.devstack.stack import DevStack
from sidecar.errors import ConfigError, Scrubber, TokenRejected, TokenUnavailable
from sidecar.ops.checks import explain
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, LogCapture, assert_no_secrets
from tests.credentials.test_kinds_static_header import recording_origin

PROVIDER = (
    "//iam.googleapis.com/projects/123456789012/locations/global/"
    "workloadIdentityPools/spiffe-pool/providers/spire"
)
ACCOUNT = "invoicer@billing-prod.iam.gserviceaccount.com"
HOST = "storage.googleapis.com"
CLOUD = google_sts.CLOUD_PLATFORM
READ_ONLY = "https://www.googleapis.com/auth/devstorage.read_only"


class LocalGoogle:
    """Google's STS and IAM Credentials, as documented, on loopback."""

    def __init__(self) -> None:
        self.sts: list[dict[str, str]] = []
        self.iam: list[dict[str, Any]] = []
        self.issued: list[str] = []
        self.base = ""

    def _token(self, prefix: str, *parts: str) -> str:
        token = f"ya29.{prefix}." + hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
        self.issued.append(token)
        return token

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/v1/token":
            return await self._sts(request)
        if request.path.endswith(":generateAccessToken"):
            return await self._iam(request)
        return web.json_response({"error": "not_found"}, status=404)

    async def _sts(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.sts.append(form)

        def bad(why: str) -> web.Response:
            return web.json_response(
                {"error": "invalid_request", "error_description": why}, status=400
            )

        if request.headers.get("Authorization"):
            return bad("workload identity federation takes no client authentication")
        expected = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "audience": PROVIDER,
            "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        }
        for name, value in expected.items():
            if form.get(name) != value:
                return bad(f"{name} must be {value}")
        if not form.get("scope"):
            return bad("scope is required")
        claims = jwt.decode(form.get("subject_token", ""), options={"verify_signature": False})
        if f"https:{PROVIDER}" not in (
            [claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"]
        ):
            return web.json_response(
                {"error": "invalid_grant", "error_description": "The audience is not allowed"},
                status=400,
            )
        token = self._token("sts", form["subject_token"], form["scope"])
        return web.json_response(
            {
                "access_token": token,
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "token_type": "Bearer",
                "expires_in": 3600,
            }
        )

    async def _iam(self, request: web.Request) -> web.Response:
        body = await request.json()
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.iam.append({"path": request.path, "body": body})
        if bearer not in self.issued or ".sts." not in bearer:
            return web.json_response(
                {"error": {"code": 401, "message": "bad token", "status": "UNAUTHENTICATED"}},
                status=401,
            )
        lifetime = int(str(body.get("lifetime", "3600s")).removesuffix("s"))
        expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + lifetime))
        token = self._token("sa", bearer, request.path, " ".join(body["scope"]))
        return web.json_response({"accessToken": token, "expireTime": expire})


@contextlib.asynccontextmanager
async def local_google(stack: DevStack) -> AsyncIterator[LocalGoogle]:
    google = LocalGoogle()
    server = web.Application()
    server.router.add_route("POST", "/{tail:.*}", google.handle)
    runner = web.AppRunner(server, access_log=None)
    await runner.setup()
    tls = stack.ca.issue_server("127.0.0.1", "localhost")
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context())
    await site.start()
    google.base = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield google
    finally:
        await runner.cleanup()


def google_config(
    stack: DevStack, google: LocalGoogle, upstream: str, scopes: list[str], **server: Any
) -> config.Config:
    doc = stack.sidecar_config()
    doc["authorization_servers"] = {
        "gcp": {
            "kind": "google_sts",
            "provider": PROVIDER,
            "token_endpoint": f"{google.base}/v1/token",
            "impersonation_endpoint": google.base,
            "ca_file": str(stack.ca_file),
            **server,
        }
    }
    doc["destinations"] = [
        {
            "name": "gcs",
            "host": HOST,
            "upstream": upstream,
            "credential": "bearer",
            "authorization_server": "gcp",
            "ca_file": str(stack.ca_file),
            "allow_private": True,
            "scopes": {"default": scopes},
        }
    ]
    return config.parse(doc)


class LoopbackOnly(requests.Session):
    """google-auth's HTTP session: it may only talk to the local endpoints."""

    def __init__(self, base: str, ca_file: Path) -> None:
        super().__init__()
        self.base = base
        self.verify = str(ca_file)
        self.trust_env = False  # no proxy or CA bundle from the environment

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        assert str(url).startswith(self.base), f"google-auth tried to reach {url!r}"
        return super().request(method, url, *args, **kwargs)


def google_auth_token(
    google: LocalGoogle, svid_file: Path, ca: Path, scopes: list[str], *, account: str | None
) -> str:
    info: dict[str, Any] = {
        "type": "external_account",
        "audience": PROVIDER,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": f"{google.base}/v1/token",
        "credential_source": {"file": str(svid_file)},
    }
    if account:
        info["service_account_impersonation_url"] = (
            f"{google.base}/v1/projects/-/serviceAccounts/{account}:generateAccessToken"
        )
    credentials = identity_pool.Credentials.from_info(info, scopes=scopes)
    credentials.refresh(GoogleRequest(LoopbackOnly(google.base, ca)))
    return str(credentials.token)


@pytest.mark.parametrize("account", [None, ACCOUNT], ids=["federated", "impersonated"])
async def test_the_sidecar_and_google_auth_send_the_same_and_get_the_same(
    stack: DevStack,
    tmp_path: Path,
    logs: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
    account: str | None,
) -> None:
    monkeypatch.setenv(
        "GOOGLE_SDK_EXPERIMENTAL_PYTHON_REGIONAL_ACCESS_BOUNDARY_LOOKUP_ENABLED", "false"
    )
    scopes = [READ_ONLY] if account else [CLOUD]
    extra = {"service_account": account} if account else {}
    async with local_google(stack) as google, recording_origin(stack) as (upstream, seen):
        cfg = google_config(stack, google, upstream, scopes, **extra)
        async with Sidecar(cfg, grace=1.0) as sidecar, AppClient(sidecar) as app:
            for _ in range(2):  # the second request is served from the cache
                status, _, body = await app.request(
                    "GET", f"http://{HOST}/storage/v1/b/invoices/o", headers={"Authorization": "x"}
                )
                assert status == 200, body
            # The same JWT-SVID for Google's client: the requests can be compared field by field.
            server = cfg.authorization_servers["gcp"]
            svid = await sidecar.identity.jwt_svid(server.jwt_svid_audience)
        svid_file = tmp_path / "svid.jwt"
        svid_file.write_text(svid.token.reveal())
        theirs = await asyncio.to_thread(
            google_auth_token, google, svid_file, stack.ca_file, scopes, account=account
        )
    ours_sts, theirs_sts = google.sts
    assert ours_sts == theirs_sts  # every field, the subject token included
    if account:
        ours_iam, theirs_iam = google.iam
        assert ours_iam["path"] == theirs_iam["path"]
        assert ours_iam["body"]["scope"] == theirs_iam["body"]["scope"] == scopes
        assert ours_iam["body"]["lifetime"] == theirs_iam["body"]["lifetime"] == "3600s"
        # google-auth also sends "delegates": null; Google treats it as absent.
        assert {k for k, v in theirs_iam["body"].items() if v is not None} == set(ours_iam["body"])
    else:
        assert google.iam == []
    # The same answers give the same token, and it is what the API received.
    sent = [dict((k.lower(), v) for k, v in s["headers"])[b"authorization"] for s in seen]
    assert sent == [f"Bearer {theirs}".encode()] * 2
    assert (".sa." in theirs) == bool(account)
    assert_no_secrets(logs.text(), google.issued)


async def test_google_sts_refusals_reach_the_app_with_googles_reason(
    stack: DevStack, logs: LogCapture
) -> None:
    async with local_google(stack) as google, recording_origin(stack) as (upstream, seen):
        # The JWT-SVID for another audience than the provider allows.
        cfg = google_config(stack, google, upstream, [CLOUD], svid_audience="https://elsewhere")
        async with Sidecar(cfg, grace=1.0) as sidecar, AppClient(sidecar) as app:
            status, _, body = await app.request("GET", f"http://{HOST}/x")
    assert status == 502
    error = json.loads(body)
    assert error["authorization_server_error"] == "invalid_grant"  # Google's text: logs only
    assert "The audience is not allowed" not in body.decode()
    assert "The audience is not allowed" in logs.text()
    assert seen == []
    assert_no_secrets(logs.text(), google.issued)


def test_iam_credentials_errors_and_bad_answers_are_refused() -> None:
    sent = "ya29.sts.federated-token-that-was-sent-0123456789"
    message = f"Permission denied for {sent} on the service account"
    answer = {"error": {"code": 403, "message": message, "status": "PERMISSION_DENIED"}}
    with pytest.raises(TokenRejected) as info:
        google_sts.parse_generated(
            403, json.dumps(answer).encode(), route="r", now=0.0, wall=0.0, scrub=Scrubber([sent])
        )
    assert info.value.upstream_error == "PERMISSION_DENIED"
    assert info.value.peer_text is not None
    assert "on the service account" in info.value.peer_text
    assert sent[10:30] not in info.value.peer_text
    assert "Permission denied" not in json.dumps(info.value.body())
    weird = json.dumps({"error": {"status": "Made up", "message": "x"}}).encode()
    with pytest.raises(TokenUnavailable) as unavailable:
        google_sts.parse_generated(503, weird, route="r", now=0.0, wall=0.0)
    assert unavailable.value.upstream_error == "unknown"
    for body in (
        b"{}",
        b'{"accessToken": "a b", "expireTime": "2026-01-01T00:00:00Z"}',
        b'{"accessToken": "ya29.x", "expireTime": "soon"}',
        b"not json",
    ):
        with pytest.raises(TokenRejected):
            google_sts.parse_generated(200, body, route="r", now=0.0, wall=0.0)
    token = google_sts.parse_generated(
        200,
        b'{"accessToken": "ya29.x", "expireTime": "1970-01-01T01:00:00.5Z"}',
        route="r",
        now=10.0,
        wall=0.0,
    )
    assert token.expires_at == 10.0 + 3600


def test_google_config_is_validated_and_explained(stack: DevStack) -> None:
    doc = {
        "spiffe": {"socket": "unix:///tmp/agent.sock"},
        "authorization_servers": {
            "gcp": {
                "kind": "google_sts",
                "provider": "projects/1/pools/x",
                "service_account": "not-an-email",
                "grant": "jwt_bearer",
                "impersonation_endpoint": "https://iam.example/path",
            },
            "gcp2": {"kind": "google_sts", "lifetime": 60},
        },
        "destinations": [
            {"host": "a.example", "authorization_server": "gcp"},  # dpop: needs an oauth server
        ],
    }
    with pytest.raises(ConfigError) as info:
        config.parse(doc)
    text = str(info.value)
    for expected in (
        "authorization_servers.gcp.provider: must be //iam.googleapis.com/projects/",
        "authorization_servers.gcp.service_account: must be a service account e-mail address",
        "authorization_servers.gcp.grant: is not used with kind: google_sts",
        "authorization_servers.gcp.impersonation_endpoint: must be an origin",
        "authorization_servers.gcp2.provider: is required",
        "authorization_servers.gcp2.lifetime: is only used with service_account",
        "destinations[0].authorization_server: 'gcp' is a google_sts server; credential dpop",
    ):
        assert expected in text, text
    google = LocalGoogle()
    google.base = "https://127.0.0.1:1"
    cfg = google_config(stack, google, "https://127.0.0.1:2", [READ_ONLY], service_account=ACCOUNT)
    server = cfg.authorization_servers["gcp"]
    assert server.jwt_svid_audience == f"https:{PROVIDER}"
    text, _ = explain(cfg, "GET", f"http://{HOST}/storage/v1/b")
    assert f"provider       {PROVIDER} (JWT-SVID audience https:{PROVIDER})" in text
    assert f"impersonates   {ACCOUNT}, 3600 s" in text
