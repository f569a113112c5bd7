"""CONNECT tunnels and per-route local ports, end to end on loopback."""

from __future__ import annotations

import json
import socket
from typing import Any

import aiohttp

from sidecar.devstack.stack import SAAS_HOST, DevStack
from tests.conftest import AppClient, LogCapture, running_sidecar


def with_tunnel(stack: DevStack, **extra: Any) -> dict[str, Any]:
    tunnel = {
        "name": "direct-tls",
        "host": "localhost",
        "tunnel": True,
        "tunnel_ports": [stack.saas.port],
        "allow_private": True,
        **extra,
    }
    saas = stack.sidecar_config()["destinations"][0]
    return {"destinations": [saas, tunnel]}


async def test_a_tunnel_route_is_a_blind_pipe_without_credentials(
    stack: DevStack, logs: LogCapture
) -> None:
    async with (
        running_sidecar(stack, **with_tunnel(stack)) as sidecar,
        aiohttp.ClientSession() as app,
    ):
        url = f"https://localhost:{stack.saas.port}/headers"
        async with app.get(
            url, proxy=f"http://{sidecar.proxy_address}", ssl=stack.ca.client_context()
        ) as resp:
            body = await resp.read()
        # End-to-end TLS through the tunnel: the app's own request, no token added.
        assert resp.status == 401, body
        seen = stack.saas.requests[-1]
        assert "Authorization" not in dict(seen.headers)
        assert stack.auth_server.token_requests == []
    closed = [r for r in logs.records if r.getMessage() == "tunnel closed"]
    assert closed
    assert closed[0].__dict__["route"] == "direct-tls"
    assert closed[0].__dict__["bytes_up"] > 0


async def test_a_tunnel_route_refuses_other_ports(stack: DevStack) -> None:
    async with (
        running_sidecar(stack, **with_tunnel(stack)) as sidecar,
        AppClient(sidecar) as app,
    ):
        answer = await app.raw(b"CONNECT localhost:22 HTTP/1.1\r\nHost: localhost:22\r\n\r\n")
    assert answer.split(b" ", 2)[1] == b"403"
    assert b"allows ports" in answer


async def test_plain_http_to_a_tunnel_only_host_is_refused(stack: DevStack) -> None:
    async with (
        running_sidecar(stack, **with_tunnel(stack)) as sidecar,
        AppClient(sidecar) as app,
    ):
        status, _, body = await app.request("GET", "http://localhost/x")
    assert status == 403
    assert "tunnel-only" in json.loads(body)["detail"]


async def test_local_port_takes_origin_form_requests_for_its_route(stack: DevStack) -> None:
    with socket.socket() as s:  # a free port for the route
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with (
        running_sidecar(stack, destination={"local_port": port}) as sidecar,
        aiohttp.ClientSession() as app,
    ):
        assert sidecar.local_addresses["saas"].port == port
        async with app.get(
            f"http://127.0.0.1:{port}/v1/invoices?x=1", headers={"Host": "whatever"}
        ) as resp:
            assert resp.status == 200, await resp.read()
    seen = stack.saas.requests[-1]
    assert seen.raw_path == "/v1/invoices?x=1"
    assert seen.token_claims is not None
    assert seen.token_claims["scope"] == "invoices:read"
    assert seen.proof_claims is not None
    assert seen.proof_claims["htu"] == f"{stack.saas.base_url}/v1/invoices"
    assert SAAS_HOST not in dict(seen.headers)["Host"]
