"""Interop with Keycloak: SPIFFE client authentication (draft-ietf-oauth-spiffe-client-auth) as
the reference implementation does it, through the real sidecar.

Keycloak's SPIFFE identity provider fetches the dev trust domain's JWT keys from a SPIFFE
bundle endpoint; the realm's client (``federated-jwt`` authenticator) is found by the
assertion's SPIFFE ID. Tokens are DPoP-bound when the sidecar sends a proof, and the protected
API checks ``cnf.jkt`` against the proof on every request. Keycloak's refusals reach the app
as the sidecar's documented ``token_request_rejected`` (502), with nothing sent upstream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from sidecar.devstack.pki import TrustDomain
from sidecar.devstack.saas_api import DevSaasApi
from sidecar.devstack.stack import SPIFFE_ID, DevStack, dev_stack
from tests.conftest import AppClient, LogCapture, assert_no_secrets, running_sidecar
from tests.interop.keycloak.server import FEDERATION_REALM, OIDC_CLIENT, SPIFFE_CLIENT, Keycloak
from tests.interop.peers import URL, credentials_seen, resource_server, served
from tests.interop.recipes import recipe

JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
VENDOR = "https://api.vendor.example"  # the API of the config/README recipe
# A JVM's first token requests are slow (code still being compiled): a request may wait for its
# token longer than the default tokens.wait (3 s) without the test being about that.
TOKENS = {"prefetch": False, "wait": 30}


@pytest.fixture
async def api(stack: DevStack, keycloak: Keycloak, logs: LogCapture) -> AsyncIterator[DevSaasApi]:
    """This test's trust domain published to Keycloak, and the API trusting Keycloak's keys."""
    keycloak.bundle.serve(stack.trust_domain)
    async with resource_server(stack, keycloak.issuer, lambda: keycloak.jwks) as saas:
        yield saas
    assert_no_secrets(logs.text(), credentials_seen([saas]))


def overrides(keycloak: Keycloak, api: DevSaasApi, **server: Any) -> dict[str, Any]:
    return {
        "authorization_server": {
            "issuer": keycloak.issuer,
            "ca_file": str(keycloak.ca_file),
            "client_auth": "jwt_svid",
            **server,
        },
        "destination": {"upstream": api.base_url},
        "tokens": TOKENS,
    }


async def call(stack: DevStack, settings: dict[str, Any], *requests: str) -> list[Any]:
    async with running_sidecar(stack, **settings) as sidecar, AppClient(sidecar) as app:
        answers = [await app.request(method, URL, data=b"{}") for method in requests]
        return [(status, body, sidecar.dpop_key.thumbprint) for status, _, body in answers]


async def test_jwt_svid_client_auth_gets_a_dpop_bound_token(
    stack: DevStack, keycloak: Keycloak, api: DevSaasApi
) -> None:
    answers = await call(stack, overrides(keycloak, api), "GET", "POST")
    assert [status for status, _, _ in answers] == [200, 200], answers
    thumbprint = answers[0][2]
    claims = served(api)
    assert [c["scope"].split() for c in claims] == [["invoices:read"], ["invoices:write"]]
    for token in claims:
        assert token["iss"] == keycloak.issuer
        assert token["azp"] == SPIFFE_CLIENT  # the realm's client, found by the SPIFFE ID
        assert token["cnf"]["jkt"] == thumbprint  # bound to the sidecar's DPoP key
        assert "https://api.saas.example" in (
            [token["aud"]] if isinstance(token["aud"], str) else token["aud"]
        )
    assert all(seen.proof_claims for seen in api.requests)  # a proof with each request
    # The JWT-SVID asked for names the realm (the draft's audience), exactly one audience.
    assert set(stack.workload_api.jwt_svid_requests) == {(keycloak.issuer,)}


async def test_bearer_route_gets_an_unbound_token(
    stack: DevStack, keycloak: Keycloak, api: DevSaasApi
) -> None:
    api.accept_bearer = True
    settings = overrides(keycloak, api)
    settings["destination"]["token_type"] = "bearer"
    [(status, body, _)] = await call(stack, settings, "GET")
    assert status == 200, body
    [seen] = api.requests
    headers = {k.lower(): v for k, v in seen.headers}
    assert headers["authorization"].startswith("Bearer ")
    assert "dpop" not in headers
    assert seen.token_claims is not None
    assert "cnf" not in seen.token_claims


async def test_a_configured_client_id_is_sent_and_accepted(
    stack: DevStack, keycloak: Keycloak, api: DevSaasApi
) -> None:
    [(status, body, _)] = await call(
        stack, overrides(keycloak, api, client_id=SPIFFE_CLIENT), "GET"
    )
    assert status == 200, body
    assert served(api)[0]["azp"] == SPIFFE_CLIENT


def refused(answers: list[Any], api: DevSaasApi) -> dict[str, Any]:
    [(status, body, _)] = answers
    assert status == 502, body
    doc: dict[str, Any] = json.loads(body)
    assert doc["error"] == "token_request_rejected"
    assert doc["authorization_server_error"].startswith(("invalid_client", "unauthorized_client"))
    assert api.requests == []  # nothing went upstream
    return doc


async def test_a_jwt_svid_for_another_audience_is_refused(
    stack: DevStack, keycloak: Keycloak, api: DevSaasApi
) -> None:
    wrong = overrides(keycloak, api, svid_audience="https://as.other.example")
    refused(await call(stack, wrong, "GET"), api)
    assert set(stack.workload_api.jwt_svid_requests) == {("https://as.other.example",)}


async def test_a_jwt_svid_from_another_trust_domain_is_refused(
    tmp_path: Path, keycloak: Keycloak, logs: LogCapture
) -> None:
    other = "spiffe://other.example/ns/billing/sa/legacy-invoicer"
    async with dev_stack(tmp_path, spiffe_id=other) as stack:
        keycloak.bundle.serve(stack.trust_domain)
        async with resource_server(stack, keycloak.issuer, lambda: keycloak.jwks) as api:
            refused(await call(stack, overrides(keycloak, api), "GET"), api)
    assert_no_secrets(logs.text(), stack.secrets())


async def test_a_jwt_svid_signed_by_a_key_outside_the_bundle_is_refused(
    stack: DevStack, keycloak: Keycloak, api: DevSaasApi
) -> None:
    keycloak.bundle.serve(TrustDomain("example.org"))  # same name, other keys
    refused(await call(stack, overrides(keycloak, api), "GET"), api)


async def post_assertion(keycloak: Keycloak, assertion: str) -> tuple[int, dict[str, Any]]:
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_SPIFFE,
        "client_assertion": assertion,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(keycloak.token_endpoint, data=form, ssl=keycloak.ssl_context()) as answer,
    ):
        return answer.status, await answer.json()


async def test_an_expired_jwt_svid_is_refused_by_keycloak(
    stack: DevStack, keycloak: Keycloak, api: DevSaasApi
) -> None:
    """The sidecar never presents an expired JWT-SVID (the Workload API client checks ``exp``
    on fetch, the identity cache stops before it), so Keycloak's own check is driven directly:
    the same trust domain, client and audience, one assertion fresh and one expired."""
    domain = stack.trust_domain
    fresh = domain.issue_jwt_svid(SPIFFE_ID, [keycloak.issuer], ttl=120)
    expired = domain.issue_jwt_svid(SPIFFE_ID, [keycloak.issuer], ttl=-60)
    status, doc = await post_assertion(keycloak, fresh)
    assert status == 200, doc
    assert doc["token_type"].lower() == "bearer"  # no proof sent
    status, doc = await post_assertion(keycloak, expired)
    assert status in (400, 401), doc  # Keycloak answers 400 for an inactive assertion
    assert doc["error"] == "invalid_client", doc


async def test_a_new_jwt_svid_signing_key_keeps_working(
    stack: DevStack, keycloak: Keycloak, api: DevSaasApi
) -> None:
    [(status, body, _)] = await call(stack, overrides(keycloak, api), "GET")
    assert status == 200, body
    fetches = keycloak.bundle.fetches
    new_kid = stack.trust_domain.rotate_jwt_key()
    # A new sidecar (pod restart) holds no cached JWT-SVID: its assertion carries the new kid.
    [(status, body, _)] = await call(stack, overrides(keycloak, api), "GET")
    assert status == 200, body
    assert jwt.get_unverified_header(stack.workload_api.jwt_svids_issued[-1])["kid"] == new_kid
    assert keycloak.bundle.fetches > fetches  # Keycloak fetched the bundle for the new key


class IssuingTrustDomain:
    """The dev trust domain minting JWT-SVIDs with an ``iss``, as SPIRE does when its server
    sets ``jwt_issuer`` (what Entra ID-style federation needs)."""

    def __init__(self, domain: TrustDomain, issuer: str) -> None:
        self._domain = domain
        self.issuer = issuer
        self.name = domain.name

    def issue_jwt_svid(self, spiffe_id: str, audience: Any, ttl: float = 300.0) -> str:
        plain = self._domain.issue_jwt_svid(spiffe_id, audience, ttl)
        header = jwt.get_unverified_header(plain)
        claims = jwt.decode(plain, options={"verify_signature": False})
        key = dict(self._domain._jwt_keys)[header["kid"]]
        return jwt.encode({**claims, "iss": self.issuer}, key, algorithm="ES256", headers=header)

    def jwks(self) -> dict[str, Any]:
        return self._domain.jwks()

    def jwks_bytes(self) -> bytes:
        return self._domain.jwks_bytes()


async def test_rfc7523_client_assertion_from_an_oidc_issuer(
    stack: DevStack, keycloak: Keycloak, api: DevSaasApi
) -> None:
    """The Entra-style path: ``client_auth: jwt_bearer`` with a JWT-SVID that has an ``iss``,
    accepted by Keycloak's OIDC identity provider (federated client authentication), with the
    configured ``client_id`` beside the assertion."""
    issuer = f"{keycloak.bundle.url}/oidc"
    stack.workload_api.trust_domain = IssuingTrustDomain(stack.trust_domain, issuer)  # type: ignore[assignment]
    realm = keycloak.realm_issuer(FEDERATION_REALM)
    async with resource_server(stack, realm, lambda: keycloak.realm_jwks(realm)) as federated:
        settings = overrides(
            keycloak, federated, issuer=realm, client_auth="jwt_bearer", client_id=OIDC_CLIENT
        )
        [(status, body, thumbprint)] = await call(stack, settings, "GET")
    assert status == 200, body
    [token] = served(federated)
    assert token["azp"] == OIDC_CLIENT
    assert token["cnf"]["jkt"] == thumbprint


async def test_the_keycloak_recipe_in_the_config_readme_runs(
    stack: DevStack, keycloak: Keycloak, logs: LogCapture
) -> None:
    doc = recipe("Keycloak")
    [server] = doc["authorization_servers"].values()
    assert server["issuer"].endswith("/realms/workloads")  # the realm of realm.json
    server.update(issuer=keycloak.issuer, ca_file=str(keycloak.ca_file))
    keycloak.bundle.serve(stack.trust_domain)
    vendor_rules = (("GET", "/v1", "vendor.read"),)
    rs = resource_server(
        stack, keycloak.issuer, lambda: keycloak.jwks, audience=VENDOR, scope_rules=vendor_rules
    )
    async with rs as vendor:
        [route] = doc["destinations"]
        route.update(upstream=vendor.base_url, ca_file=str(stack.ca_file), allow_private=True)
        async with (
            running_sidecar(stack, **doc, tokens=TOKENS) as sidecar,
            AppClient(sidecar) as app,
        ):
            status, _, body = await app.request("GET", f"http://{route['host']}/v1/items")
            thumbprint = sidecar.dpop_key.thumbprint
    assert status == 200, body
    [token] = served(vendor)
    assert token["scope"] == "vendor.read"
    assert token["cnf"]["jkt"] == thumbprint
    assert_no_secrets(logs.text(), credentials_seen([vendor]))
