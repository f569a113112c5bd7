"""The token request form, field by field, for every client auth and grant (issue #17).

Each case states the EXACT form: a field too many is as wrong as one missing (Entra ID refuses
an assertion without ``client_id``; Auth0 refuses a ``requested_token_type`` it did not expect).
"""

from __future__ import annotations

from typing import Any

import pytest

from sidecar import config
from sidecar.credentials.identity import JwtSvid
from sidecar.credentials.token_client import (
    JWT_BEARER_ASSERTION,
    JWT_BEARER_GRANT,
    JWT_SPIFFE,
    TOKEN_EXCHANGE,
    TokenKey,
    token_form,
)
from sidecar.secret import Secret

SPIFFE_ID = "spiffe://example.org/ns/billing/sa/legacy-invoicer"
ASSERTION = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmUifQ.sig"


def server(**settings: Any) -> config.AuthorizationServer:
    """One authorization server, parsed from YAML-shaped settings like a real config."""
    doc = {
        "spiffe": {"socket": "unix:///run/agent.sock"},
        "authorization_servers": {"as": {"token_endpoint": "https://as.example/token", **settings}},
        "destinations": [{"host": "api.example", "authorization_server": "as"}],
    }
    if settings.get("client_auth") == "client_secret":
        doc["authorization_servers"]["as"]["client_secret_file"] = "/dev/null"
    return config.parse(doc).authorization_servers["as"]


def form_for(srv: config.AuthorizationServer, **key: Any) -> dict[str, Any]:
    token_key = TokenKey(
        server=srv.name,
        client_id=srv.client_id or SPIFFE_ID,
        grant=srv.grant,
        resource=key.get("resource"),
        audience=key.get("audience"),
        scopes=key.get("scopes", ("read",)),
        jkt="thumbprint",
    )
    svid = JwtSvid(Secret(ASSERTION), SPIFFE_ID, srv.jwt_svid_audience, 0.0, 300.0)
    return token_form(srv, token_key, svid)


CC = {"grant_type": "client_credentials", "scope": "read"}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        # jwt_svid: the SPIFFE ID in the assertion names the client; client_id only if configured
        (
            {"client_auth": "jwt_svid"},
            {**CC, "client_assertion_type": JWT_SPIFFE, "client_assertion": ASSERTION},
        ),
        (
            {"client_auth": "jwt_svid", "client_id": "legacy-invoicer"},
            {
                **CC,
                "client_assertion_type": JWT_SPIFFE,
                "client_assertion": ASSERTION,
                "client_id": "legacy-invoicer",
            },
        ),
        # jwt_bearer (RFC 7523 §2.2): Entra ID needs client_id beside the assertion
        (
            {"client_auth": "jwt_bearer"},
            {**CC, "client_assertion_type": JWT_BEARER_ASSERTION, "client_assertion": ASSERTION},
        ),
        (
            {"client_auth": "jwt_bearer", "client_id": "00000000-app"},
            {
                **CC,
                "client_assertion_type": JWT_BEARER_ASSERTION,
                "client_assertion": ASSERTION,
                "client_id": "00000000-app",
            },
        ),
        # mtls (RFC 8705 §2): client_id always, the SPIFFE ID unless configured
        ({"client_auth": "mtls"}, {**CC, "client_id": SPIFFE_ID}),
        ({"client_auth": "mtls", "client_id": "corp-client"}, {**CC, "client_id": "corp-client"}),
        # client_secret: client_id travels in HTTP Basic, never in the form
        ({"client_auth": "client_secret", "client_id": "okta-app"}, CC),
        # none: a public client names itself
        ({"client_auth": "none", "client_id": "sidecar"}, {**CC, "client_id": "sidecar"}),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if "client_auth" in v else None,
)
def test_form_per_client_auth(settings: dict[str, Any], expected: dict[str, Any]) -> None:
    assert form_for(server(**settings)) == expected


def test_token_exchange_sends_the_configured_subject_token_type() -> None:
    srv = server(
        grant="token_exchange",
        client_auth="none",
        client_id="sidecar",
        subject_token_type="urn:ietf:params:oauth:token-type:id_token",
        requested_token_type="urn:ietf:params:oauth:token-type:access_token",
    )
    assert form_for(srv, audience="https://api.example", scopes=()) == {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": ASSERTION,
        "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "client_id": "sidecar",
        "audience": "https://api.example",
    }


def test_token_exchange_defaults_to_the_jwt_token_type_and_no_requested_type() -> None:
    srv = server(grant="token_exchange", client_auth="none", client_id="sidecar")
    form = form_for(srv, resource="https://api.example")
    assert form["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    assert "requested_token_type" not in form
    assert form["resource"] == "https://api.example"


def test_jwt_bearer_grant_with_client_id() -> None:
    srv = server(grant="jwt_bearer", client_auth="none", client_id="sidecar")
    assert form_for(srv) == {
        "grant_type": JWT_BEARER_GRANT,
        "assertion": ASSERTION,
        "client_id": "sidecar",
        "scope": "read",
    }
