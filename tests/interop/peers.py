"""What every interop suite shares: the protected API trusting a third-party AS, what it served,
and the credentials it saw (which must never reach a log)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sidecar.devstack.saas_api import DevSaasApi
from sidecar.devstack.stack import SAAS_HOST, SAAS_RESOURCE, SAAS_SCOPE_RULES, DevStack

URL = f"http://{SAAS_HOST}/v1/invoices"


def resource_server(
    stack: DevStack,
    issuer: str,
    jwks: Callable[[], Mapping[str, Any]],
    *,
    audience: str = SAAS_RESOURCE,
    scope_rules: Iterable[tuple[str, str, str]] = SAAS_SCOPE_RULES,
    **options: Any,
) -> DevSaasApi:
    """The strict dev SaaS API (RFC 9068 tokens, DPoP proofs checked against ``cnf.jkt``),
    trusting ``issuer``'s signing keys, with TLS from the stack's CA (not started yet)."""
    return DevSaasApi(
        issuer=issuer,
        as_jwks=jwks,
        audience=audience,
        ssl_context=stack.ca.issue_server("127.0.0.1").server_context(),
        scope_rules=scope_rules,
        **options,
    )


def served(saas: DevSaasApi) -> list[dict[str, Any]]:
    """Claims of the tokens behind the API's successful answers (not its nonce challenges)."""
    return [seen.token_claims for seen in saas.requests if seen.status == 200 and seen.token_claims]


def credentials_seen(apis: Iterable[DevSaasApi]) -> list[str]:
    """Every token and proof the APIs received: the suite checks none reached a log."""
    return [
        value.rpartition(" ")[2]
        for api in apis
        for seen in api.requests
        for name, value in seen.headers
        if name.lower() in ("authorization", "dpop")
    ]
