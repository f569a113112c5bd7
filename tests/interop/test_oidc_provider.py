"""Interop with a real third-party authorization server: oidc-provider on Node.js.

Everything the sidecar does here it does against code we did not write: metadata discovery,
RFC 8705 ``tls_client_auth`` matched on the SPIFFE ID in the X.509-SVID, RFC 9449 DPoP with
server nonces required, RFC 8707 resource indicators issuing RFC 9068 JWT access tokens, and an
RFC 8693 token exchange with the JWT-SVID as subject token. The protected API is the dev SaaS
API, trusting the provider's signing keys.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sidecar.devstack.saas_api import DevSaasApi
from sidecar.devstack.stack import SAAS_RESOURCE, DevStack
from tests.conftest import (
    AppClient,
    LogCapture,
    ManualClock,
    assert_no_secrets,
    running_sidecar,
)
from tests.interop.oidc_provider import OidcProvider, oidc_provider
from tests.interop.peers import URL, credentials_seen, resource_server, served
from tests.interop.recipes import recipe

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
SCOPES = ["invoices:read", "invoices:write"]
RESOURCES = {SAAS_RESOURCE: {"scopes": SCOPES, "ttl": 600}}
MTLS = {"client_auth": "mtls", "grant": "client_credentials", "dpop": True}


def mtls_client(spiffe_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "client_id": spiffe_id,
        "token_endpoint_auth_method": "tls_client_auth",
        "tls_client_auth_san_uri": spiffe_id,
        "dpop_bound_access_tokens": True,
        "grant_types": ["client_credentials"],
        **extra,
    }


EXCHANGER = {
    "client_id": "svid-exchanger",
    "token_endpoint_auth_method": "none",
    "dpop_bound_access_tokens": True,
    "grant_types": [TOKEN_EXCHANGE],
}


class Interop:
    """The dev stack's Workload API, oidc-provider, and a SaaS API that trusts the provider."""

    def __init__(self, stack: DevStack, provider: OidcProvider, saas: DevSaasApi) -> None:
        self.stack = stack
        self.provider = provider
        self.saas = saas

    def overrides(self, **server: Any) -> dict[str, Any]:
        as_settings = {"issuer": self.provider.issuer, **server}
        return {
            "authorization_server": as_settings,
            "destination": {"upstream": self.saas.base_url},
        }


@pytest.fixture
async def interop(stack: DevStack, logs: LogCapture) -> AsyncIterator[Callable[..., Any]]:
    """Start oidc-provider with the given clients (once per test)."""
    started: list[Any] = []

    async def start(*clients: dict[str, Any], require_nonce: bool = True) -> Interop:
        provider_cm = oidc_provider(
            stack, clients=clients, resources=RESOURCES, require_nonce=require_nonce
        )
        provider = await provider_cm.__aenter__()
        started.append(provider_cm)
        saas_cm = resource_server(
            stack, provider.issuer, lambda: provider.public_jwks, require_nonce=True
        )
        saas = await saas_cm.__aenter__()
        started.append(saas_cm)
        return Interop(stack, provider, saas)

    try:
        yield start
    finally:
        for cm in reversed(started):
            await cm.__aexit__(None, None, None)
    # No token the provider issued, and no proof the sidecar made, reached a log.
    credentials = credentials_seen(api for api in started if isinstance(api, DevSaasApi))
    assert_no_secrets(logs.text(), [*stack.secrets(), *credentials])


async def test_tls_client_auth_with_the_x509_svid_and_dpop_nonces(
    stack: DevStack, interop: Callable[..., Any]
) -> None:
    env = await interop(mtls_client(stack.spiffe_id))
    overrides = env.overrides(**MTLS)
    async with running_sidecar(stack, **overrides) as sidecar, AppClient(sidecar) as app:
        status, _, body = await app.request("GET", URL)
        assert status == 200, body
        status, _, body = await app.request("POST", URL, data=b'{"amount": 1}')
        assert status == 200, body
        thumbprint = sidecar.dpop_key.thumbprint

    await env.provider.wait_for_grants(2, "client_credentials")
    # The provider demanded a DPoP nonce; the sidecar retried with it, once per token.
    nonce_errors = [e for e in env.provider.errors() if e.get("error") == "use_dpop_nonce"]
    assert nonce_errors, env.provider.events
    assert [e for e in env.provider.errors() if e.get("error") != "use_dpop_nonce"] == []

    # The API demanded DPoP nonces too: each request was challenged once, then served.
    assert [seen.error for seen in env.saas.requests if seen.status == 401] == ["use_dpop_nonce"]
    read, write = served(env.saas)
    for claims in (read, write):
        assert claims["iss"] == env.provider.issuer
        assert claims["aud"] == SAAS_RESOURCE  # RFC 8707: the token is for this API only
        assert claims["client_id"] == stack.spiffe_id
        assert claims["cnf"] == {"jkt": thumbprint}  # RFC 9449: bound to the sidecar's key
    assert read["scope"] == "invoices:read"
    assert write["scope"] == "invoices:write"


async def test_a_certificate_for_another_spiffe_id_is_refused(
    stack: DevStack, interop: Callable[..., Any]
) -> None:
    other = "spiffe://example.org/ns/payments/sa/ledger"
    env = await interop(mtls_client(stack.spiffe_id, tls_client_auth_san_uri=other))
    overrides = env.overrides(**MTLS)
    async with running_sidecar(stack, **overrides) as sidecar, AppClient(sidecar) as app:
        status, _, body = await app.request("GET", URL)

    assert status == 502
    doc = json.loads(body)
    assert doc["error"] == "token_request_rejected"
    assert "invalid_client" in doc["authorization_server_error"]
    assert env.saas.requests == []  # fail closed: nothing reached the API
    assert env.provider.grants() == []


async def test_token_exchange_of_the_jwt_svid(stack: DevStack, interop: Callable[..., Any]) -> None:
    env = await interop(EXCHANGER)
    overrides = env.overrides(
        client_auth="none", client_id="svid-exchanger", grant="token_exchange", dpop=True
    )
    async with running_sidecar(stack, **overrides) as sidecar, AppClient(sidecar) as app:
        status, _, body = await app.request("GET", URL)
        assert status == 200, body
        thumbprint = sidecar.dpop_key.thumbprint

    await env.provider.wait_for_grants(1, TOKEN_EXCHANGE)
    (claims,) = served(env.saas)
    assert claims["spiffe_id"] == stack.spiffe_id  # the provider verified the JWT-SVID
    assert claims["act"] == {"sub": "svid-exchanger"}
    assert claims["aud"] == SAAS_RESOURCE
    assert claims["scope"] == "invoices:read"
    assert claims["cnf"] == {"jkt": thumbprint}
    # The subject token was a JWT-SVID for the provider's issuer (the default SVID audience).
    assert (env.provider.issuer,) in stack.workload_api.jwt_svid_requests


async def test_an_unknown_resource_is_refused_with_the_providers_error(
    stack: DevStack, interop: Callable[..., Any]
) -> None:
    env = await interop(mtls_client(stack.spiffe_id))
    overrides = env.overrides(**MTLS)
    overrides["destination"]["resource"] = "https://not-registered.example"
    async with running_sidecar(stack, **overrides) as sidecar, AppClient(sidecar) as app:
        status, _, body = await app.request("GET", URL)

    assert status == 502
    assert "invalid_target" in json.loads(body)["authorization_server_error"]
    assert env.saas.requests == []


async def test_x509_rotation_keeps_the_token_and_the_renewal_authenticates_the_new_svid(
    stack: DevStack, interop: Callable[..., Any]
) -> None:
    env = await interop(mtls_client(stack.spiffe_id))
    overrides = env.overrides(**MTLS)
    clock = ManualClock()
    async with (
        running_sidecar(stack, clock=clock, **overrides) as sidecar,
        AppClient(sidecar) as app,
    ):
        status, _, body = await app.request("GET", URL)
        assert status == 200, body
        rotated = asyncio.Event()
        sidecar.identity.on_x509_rotation(lambda _: rotated.set())
        stack.workload_api.rotate_x509()
        await asyncio.wait_for(rotated.wait(), 10)
        status, _, body = await app.request("GET", URL)
        assert status == 200, body
        first, second = served(env.saas)
        # The token is DPoP-bound, not certificate-bound: a rotation costs no token request.
        assert second["jti"] == first["jti"]
        clock.advance(0.85 * (first["exp"] - first["iat"]))  # past its refresh point
        status, _, body = await app.request("GET", URL)  # starts the renewal
        assert status == 200, body
        await sidecar.credentials.cache.settle()
        status, _, body = await app.request("GET", URL)
        assert status == 200, body

    # The renewal went over a connection presenting the new SVID, and the provider took it.
    await env.provider.wait_for_grants(2, "client_credentials")
    assert served(env.saas)[-1]["jti"] != first["jti"]


def from_recipe(title: str, env: Interop, **endpoint: str) -> dict[str, Any]:
    """The config/README recipe pointed at this provider: its endpoint and the test CA."""
    doc = recipe(title)
    [(name, server)] = doc["authorization_servers"].items()
    server.update(endpoint, ca_file=str(env.stack.ca_file))
    return {
        "authorization_servers": {name: server},
        "destination": {"authorization_server": name, "upstream": env.saas.base_url},
    }


async def test_the_mtls_recipe_in_the_config_readme_runs(
    stack: DevStack, interop: Callable[..., Any]
) -> None:
    env = await interop(mtls_client(stack.spiffe_id))
    settings = from_recipe("mTLS", env, issuer=env.provider.issuer)
    async with running_sidecar(stack, **settings) as sidecar, AppClient(sidecar) as app:
        status, _, body = await app.request("GET", URL)
        thumbprint = sidecar.dpop_key.thumbprint
    assert status == 200, body
    await env.provider.wait_for_grants(1, "client_credentials")
    (claims,) = served(env.saas)
    assert claims["cnf"]["jkt"] == thumbprint  # the recipe's default: DPoP


async def test_the_token_exchange_recipe_in_the_config_readme_runs(
    stack: DevStack, interop: Callable[..., Any]
) -> None:
    env = await interop({**EXCHANGER, "client_id": "sidecar"})  # the recipe's client_id
    token_endpoint = f"{env.provider.issuer.rstrip('/')}/token"
    settings = from_recipe(
        "Token exchange", env, token_endpoint=token_endpoint, svid_audience=env.provider.issuer
    )
    async with running_sidecar(stack, **settings) as sidecar, AppClient(sidecar) as app:
        status, _, body = await app.request("GET", URL)
    assert status == 200, body
    await env.provider.wait_for_grants(1, TOKEN_EXCHANGE)
    (claims,) = served(env.saas)
    assert claims["act"] == {"sub": "sidecar"}
    assert claims["spiffe_id"] == stack.spiffe_id
    assert stack.workload_api.jwt_svid_requests == [(env.provider.issuer,)]
