"""Which kind of token a route gets: the authorization server's ``dpop`` setting is the default
for its routes' ``token_type``; a route's own ``token_type`` wins (issue #17: ``dpop: false``
was parsed and never read, and proofs were still sent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar import config
from sidecar.devstack.stack import SAAS_HOST, dev_stack
from tests.conftest import AppClient, LogCapture, assert_no_secrets, running_sidecar


def route_type(server: dict[str, Any], route: dict[str, Any]) -> str:
    doc = {
        "spiffe": {"socket": "unix:///run/agent.sock"},
        "authorization_servers": {"as": {"issuer": "https://as.example", **server}},
        "destinations": [{"host": "api.example", "authorization_server": "as", **route}],
    }
    return config.parse(doc).destinations[0].token_type


@pytest.mark.parametrize(
    ("server", "route", "expected"),
    [
        ({}, {}, "dpop"),  # both defaults
        ({"dpop": True}, {}, "dpop"),
        ({"dpop": False}, {}, "bearer"),  # the AS setting is the route's default
        ({"dpop": False}, {"token_type": "dpop"}, "dpop"),  # the route's own setting wins
        ({"dpop": True}, {"token_type": "bearer"}, "bearer"),
        ({}, {"token_type": "bearer"}, "bearer"),
    ],
)
def test_token_type_follows_the_server_unless_the_route_says(
    server: dict[str, Any], route: dict[str, Any], expected: str
) -> None:
    assert route_type(server, route) == expected


def test_a_non_boolean_dpop_is_still_an_error() -> None:
    with pytest.raises(config.ConfigError) as failed:
        route_type({"dpop": "no"}, {})
    assert "authorization_servers.as.dpop: must be bool" in str(failed.value)


async def test_dpop_false_sends_no_proof_and_presents_a_bearer_token(
    tmp_path: Path, logs: LogCapture
) -> None:
    bearer_ok = {"auth_server": {"require_dpop": False}, "saas": {"accept_bearer": True}}
    async with dev_stack(tmp_path, **bearer_ok) as stack:
        overrides = {"authorization_server": {"dpop": False}}
        async with running_sidecar(stack, **overrides) as sidecar, AppClient(sidecar) as app:
            status, _, body = await app.request("GET", f"http://{SAAS_HOST}/v1/invoices")
        assert status == 200, body
        [token_request] = stack.auth_server.token_requests
        assert token_request.dpop_jkt is None  # no proof reached the AS
        [seen] = stack.saas.requests
        names = {k.lower() for k, _ in seen.headers}
        assert "dpop" not in names
        assert {k.lower(): v for k, v in seen.headers}["authorization"].startswith("Bearer ")
        assert seen.token_claims is not None
        assert "cnf" not in seen.token_claims
    assert_no_secrets(logs.text(), stack.secrets())
