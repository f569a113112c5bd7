"""Readiness per route: the pure policy, the body beyond loopback, and both policies through
the real sidecar against the dev AS going down and coming back."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.ops.readiness import evaluate, is_loopback_peer, response, route_readiness
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, LogCapture, ManualClock, running_sidecar
from tests.ops.test_admin import admin_get

URL = f"http://{SAAS_HOST}/v1/invoices"


@pytest.mark.parametrize(
    ("holds", "last_ok", "state", "ready"),
    [
        (True, None, "ready", True),
        (True, True, "ready", True),
        (True, False, "stale", True),
        (False, True, "idle", True),
        (False, None, "pending", False),
        (False, False, "failing", False),
    ],
)
def test_route_states(holds: bool, last_ok: bool | None, state: str, ready: bool) -> None:
    route = route_readiness(holds_token=holds, last_ok=last_ok, last_reason="invalid_client")
    assert (route.state, route.ready) == (state, ready)


def routes(**states: tuple[bool, bool | None, bool]) -> dict[str, Any]:
    return {
        name: route_readiness(holds_token=h, last_ok=ok, last_reason="invalid_client", ever_ok=e)
        for name, (h, ok, e) in states.items()
    }


def test_startup_policy_ignores_blips_after_every_route_got_a_token_once() -> None:
    blip = routes(a=(False, False, True), b=(True, True, True))
    assert evaluate(policy="startup", stopping=False, loaded=True, identity=None, routes=blip).ready
    strict = evaluate(policy="strict", stopping=False, loaded=True, identity=None, routes=blip)
    assert not strict.ready
    assert strict.problems == {
        "route a": ("failing", "no usable token; its last token request failed (invalid_client)")
    }
    never = routes(a=(False, False, False), b=(True, True, True))
    assert not evaluate(
        policy="startup", stopping=False, loaded=True, identity=None, routes=never
    ).ready


def test_identity_loading_and_stopping_make_it_unready_under_either_policy() -> None:
    fine = routes(a=(True, True, True))
    for policy in ("startup", "strict"):
        kwargs: dict[str, Any] = {"policy": policy, "routes": fine}
        assert not evaluate(
            stopping=False, loaded=True, identity=("expired", "why"), **kwargs
        ).ready
        assert not evaluate(stopping=True, loaded=True, identity=None, **kwargs).ready
        assert not evaluate(stopping=False, loaded=False, identity=None, **kwargs).ready


def test_beyond_loopback_the_body_has_states_not_texts() -> None:
    readiness = evaluate(
        policy="strict",
        stopping=False,
        loaded=True,
        identity=("unavailable", "no SVID from the Workload API at unix:///run/agent.sock"),
        routes=routes(saas=(False, False, True)),
    )
    status, body = response(readiness, peer_is_loopback=False)
    assert status == 503
    assert body == {
        "ready": False,
        "problems": {"identity": "unavailable", "route saas": "failing"},
        "identity": "unavailable",
        "routes": {"saas": "failing"},
    }
    status, body = response(readiness, peer_is_loopback=True)
    assert "unix:///run/agent.sock" in body["problems"]["identity"]
    assert "invalid_client" in body["routes"]["saas"]["reason"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.7", False),
        ("::ffff:10.0.0.7", False),
        ("0.0.0.0", False),  # noqa: S104 - a value given to the classifier, never bound
        ("fe80::1%eth0", False),
        ("localhost", False),  # a peer address is never a name
        ("", False),
        (None, False),
        ("garbage", False),
    ],
)
def test_loopback_peers(host: str | None, loopback: bool) -> None:
    assert is_loopback_peer(host) is loopback


def gauge(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name}{labels} is missing")


async def outage(sidecar: Sidecar, stack: DevStack, clock: ManualClock) -> tuple[int, str]:
    """Get a token, let it expire while the AS is down; the app's answer and the metrics."""
    async with AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        stack.auth_server.set_down(True)
        clock.advance(400)  # past the token's 300 s
        status, headers, body = await app.request("GET", URL)
    assert status == 503, body
    assert headers["Retry-After"]
    assert json.loads(body)["error"] == "token_unavailable"
    return await admin_get(sidecar, "/metrics")


async def test_startup_policy_stays_ready_through_an_as_outage(stack: DevStack) -> None:
    clock = ManualClock()
    async with running_sidecar(stack, clock=clock) as sidecar:
        _, metrics = await outage(sidecar, stack, clock)
        status, body = await admin_get(sidecar, "/readyz")
        assert status == 200, body
        assert body["routes"]["saas"]["state"] == "failing"
        assert "temporarily_unavailable" in body["routes"]["saas"]["reason"]
        assert gauge(metrics, "sidecar_route_ready", route="saas") == 0.0
        expiry = gauge(metrics, "sidecar_token_expiry_seconds", authorization_server="dev")
        assert expiry <= 0
        assert not math.isnan(expiry)


async def test_strict_policy_is_unready_while_a_route_has_no_usable_token(
    stack: DevStack,
) -> None:
    clock = ManualClock()
    async with running_sidecar(stack, clock=clock, readiness="strict") as sidecar:
        assert (await admin_get(sidecar, "/readyz"))[0] == 503  # no token yet
        _, metrics = await outage(sidecar, stack, clock)
        status, body = await admin_get(sidecar, "/readyz")
        assert status == 503
        assert "route saas" in body["problems"]
        assert gauge(metrics, "sidecar_route_ready", route="saas") == 0.0
        # The AS comes back: the timer's short retry gets a token without any request.
        stack.auth_server.set_down(False)
        clock.advance(10)
        sidecar.credentials.cache.refresh_due()
        await sidecar.credentials.cache.settle()
        status, body = await admin_get(sidecar, "/readyz")
        assert status == 200, body
        metrics = (await admin_get(sidecar, "/metrics"))[1]
        assert gauge(metrics, "sidecar_route_ready", route="saas") == 1.0
        assert gauge(metrics, "sidecar_token_expiry_seconds", authorization_server="dev") > 60


async def test_svid_series_are_reported_whatever_the_client_auth(
    stack: DevStack, logs: LogCapture
) -> None:
    async with running_sidecar(stack) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        await sidecar.identity.x509_svid()  # the stream's first delivery (on its thread)
        metrics = (await admin_get(sidecar, "/metrics"))[1]
    assert gauge(metrics, "sidecar_svid_expiry_seconds", type="x509") > 60  # jwt_svid auth
    assert gauge(metrics, "sidecar_workload_api_events_total", event="stream_broken") == 0
    assert any(
        r.name == "sidecar.audit" and getattr(r, "event", None) == "svid_received"
        for r in logs.records
    )
