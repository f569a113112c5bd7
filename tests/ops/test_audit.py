"""Audit lines: one per request, parsed and checked; issuance and denial are recorded too."""

from __future__ import annotations

import json
from typing import Any

from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.ops.logs import JsonFormatter
from tests.conftest import AppClient, LogCapture, running_sidecar


def audit_lines(logs: LogCapture, event: str) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    docs = [json.loads(formatter.format(r)) for r in logs.records if r.name == "sidecar.audit"]
    return [d for d in docs if d.get("event") == event]


async def test_one_audit_line_per_request_with_the_token_identity(
    stack: DevStack, app: AppClient, logs: LogCapture
) -> None:
    await app.request("GET", f"http://{SAAS_HOST}/v1/invoices/42?customer=acme")
    await app.request("POST", f"http://{SAAS_HOST}/v1/invoices", data=b"{}")
    await app.request("GET", f"http://{SAAS_HOST}/v1/invoices/43")
    lines = audit_lines(logs, "request")
    assert len(lines) == 3
    first = lines[0]
    claims = stack.saas.requests[0].token_claims
    assert claims is not None
    assert first["spiffe_id"] == stack.spiffe_id
    assert first["route"] == "saas"
    assert first["method"] == "GET"
    assert first["host"] == SAAS_HOST
    assert first["path"] == "/v1/invoices/42"
    assert "query" not in first  # not by default
    assert "acme" not in json.dumps(lines)
    assert first["scopes"] == "invoices:read"
    assert first["status"] == 200
    assert first["cache"] == "miss"
    assert first["token_jti"] == claims["jti"]
    assert first["token_sub"] == stack.spiffe_id
    assert first["token_client_id"] == stack.spiffe_id
    assert isinstance(first["latency_ms"], float)
    assert lines[1]["scopes"] == "invoices:write"
    assert lines[2]["cache"] == "hit"
    issued = audit_lines(logs, "token_issued")
    assert [i["jti"] for i in issued] == [
        r.token_claims["jti"] for r in stack.saas.requests[:2] if r.token_claims
    ]


async def test_denied_requests_are_audited_with_the_reason(
    stack: DevStack, app: AppClient, logs: LogCapture
) -> None:
    await app.request("GET", "http://evil.example/exfiltrate")
    (line,) = audit_lines(logs, "request")
    assert line["status"] == 403
    assert line["error"] == "destination_not_allowed"
    assert "route" not in line


async def test_query_strings_are_audited_only_when_configured(
    stack: DevStack, logs: LogCapture
) -> None:
    async with (
        running_sidecar(stack, log={"audit_query": True}) as sidecar,
        AppClient(sidecar) as app,
    ):
        await app.request("GET", f"http://{SAAS_HOST}/v1/invoices?page=2")
    (line,) = audit_lines(logs, "request")
    assert line["query"] == "page=2"


async def test_retries_are_audited(stack: DevStack, app: AppClient, logs: LogCapture) -> None:
    await app.request("GET", f"http://{SAAS_HOST}/v1/invoices")
    claims = stack.saas.requests[-1].token_claims
    assert claims is not None
    stack.saas.revoked.add(claims["jti"])
    await app.request("GET", f"http://{SAAS_HOST}/v1/invoices")
    assert audit_lines(logs, "request")[-1]["retry"] == "invalid_token"
