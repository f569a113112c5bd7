"""Transparent capture with real kernel networking: namespaces, veth, `sidecar iptables`, and
apps that know nothing about the sidecar (curl --noproxy, urllib with proxies={}, Java's
HttpURLConnection without proxy properties). See tests/proxy/netns.py for the layout; every
address used exists only inside the namespaces a test creates (or on their loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar import config
from sidecar.devstack.stack import DevStack, dev_stack
from sidecar.runtime import Sidecar
from tests.conftest import LogCapture, assert_no_secrets
from tests.proxy.netns import APP_ENV, Namespaces, namespaces, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

PORT = 15006  # the transparent listener (a fresh namespace per test: always free)
PEER_PORT = 8080
HOSTS = ("api.saas.example", "unrouted.example", "tunnel.example")
HOSTS6 = ("unrouted6.example",)  # resolves to the peer's IPv6 address
CLIENTS = Path(__file__).parent / "clients"


@pytest.fixture
def spaces() -> Iterator[Namespaces]:
    with namespaces(HOSTS, HOSTS6) as made:
        yield made


async def run(argv: list[str], *, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else APP_ENV,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def rules(spaces: Namespaces, action: str, *, ipv6: bool = False) -> None:
    argv = [sys.executable, "-m", "sidecar", "iptables", action, "--uid", "0", "--port", str(PORT)]
    family = [] if ipv6 else ["--no-ipv6"]
    code, _out, err = await run(spaces.root_command(*argv, *family), env=dict(os.environ))
    assert code == 0, err


@contextlib.asynccontextmanager
async def captured(
    spaces: Namespaces,
    tmp_path: Path,
    logs: LogCapture,
    *,
    unmatched: str = "passthrough",
    resolves_to: str | None = None,
    destination: dict[str, Any] | None = None,
    extra_destinations: list[dict[str, Any]] | None = None,
    ipv6: bool = False,
    peek_timeout: float = 1.0,
    intercept: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[DevStack, Sidecar]]:
    """The dev stack and a sidecar with a transparent listener, inside the app namespace, with
    the rules installed by `sidecar iptables` (removed again at the end)."""
    address = resolves_to or spaces.peer_ip

    async def resolver(host: str) -> set[str]:  # names resolve as in the app's hosts file
        if host in HOSTS6:
            return {spaces.peer_ip6}
        return {address} if host in HOSTS else set()

    with spaces.inside(spaces.app):
        async with dev_stack(tmp_path) as stack:
            doc = stack.sidecar_config(
                transparent={
                    "listen": f"127.0.0.1:{PORT}",
                    "unmatched": unmatched,
                    "ipv6": ipv6,
                    "peek_timeout": peek_timeout,
                },
                destination=destination or {},
            )
            doc["destinations"] += extra_destinations or []
            if intercept is not None:
                doc["intercept"] = intercept
            async with Sidecar(config.parse(doc), grace=5.0, resolver=resolver) as sidecar:
                audience = sidecar.config.authorization_servers["dev"].jwt_svid_audience
                async with asyncio.timeout(30):  # the first SVID, before any app runs
                    await sidecar.identity.wait_until_ready(audience)
                await rules(spaces, "install", ipv6=ipv6)
                try:
                    yield stack, sidecar
                finally:
                    await rules(spaces, "remove", ipv6=ipv6)
        assert_no_secrets(logs.text(), stack.secrets())


def count(sidecar: Sidecar, name: str, **labels: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


class PeerServer:
    """A server in the peer namespace ("the internet"): answers every request with the raw
    bytes it received, and remembers them."""

    def __init__(self, spaces: Namespaces, port: int = PEER_PORT, *, ipv6: bool = False) -> None:
        self._sock = spaces.listen_in_peer(port, ipv6=ipv6)
        self.received: list[bytes] = []
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> PeerServer:
        self._server = await asyncio.start_server(self._serve, sock=self._sock)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.received.append(getattr(exc, "partial", b""))
            writer.close()
            return
        self.received.append(head)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(head)
        )
        writer.write(head)
        await writer.drain()
        writer.close()


def curl(spaces: Namespaces, url: str, *extra: str) -> list[str]:
    argv = ["curl", "-sS", "--noproxy", "*", "-m", "20", "-w", "\n%{http_code}", *extra, url]
    return spaces.app_command(*argv)


def split_curl(out: str) -> tuple[int, str]:
    body, _, status = out.rpartition("\n")
    return int(status), body


URLLIB_TLS = """
import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[3])
handlers = [urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)]
opener = urllib.request.build_opener(*handlers)
with opener.open(urllib.request.Request(sys.argv[2], method=sys.argv[1]), timeout=20) as resp:
    print(resp.status, resp.read().decode())
"""

URLLIB = """
import json, sys, urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
req = urllib.request.Request(sys.argv[2], data=data, method=sys.argv[1],
                             headers={"Content-Type": "application/json"})
try:
    with opener.open(req, timeout=20) as resp:
        print(resp.status, resp.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


@pytest.fixture(scope="module")
def java_classes() -> Iterator[Path]:
    if shutil.which("javac") is None or shutil.which("java") is None:
        pytest.skip("no Java 17 toolchain (javac, java) on this machine")
    out = Path(tempfile.mkdtemp(prefix="sidecar-java-"))
    try:
        out.chmod(0o755)  # the app's uid runs the class
        subprocess.run(  # noqa: S603
            ["javac", "-d", str(out), str(CLIENTS / "Plain.java")],  # noqa: S607
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def app_argv(
    spaces: Namespaces, client: str, method: str, url: str, body: str | None, java: Path | None
) -> list[str]:
    if client == "curl":
        extra = ["-X", method] + (
            ["-H", "Content-Type: application/json", "--data", body] if body else []
        )
        return curl(spaces, url, *extra)
    if client == "urllib":
        return spaces.app_command(
            "/usr/bin/python3", "-I", "-c", URLLIB, method, url, *([body] if body else [])
        )
    assert java is not None
    return spaces.app_command(
        "java",
        "-Duser.home=/tmp",
        "-cp",
        str(java),
        "Plain",
        method,
        url,
        *([body] if body else []),
    )


def parse_answer(client: str, out: str) -> tuple[int, str]:
    if client == "curl":
        return split_curl(out)
    status, _, body = out.strip().partition(" ")
    return int(status), body


@pytest.mark.parametrize("client", ["curl", "urllib", "java"])
async def test_apps_without_proxy_settings_get_the_api_with_a_dpop_bound_token(
    client: str,
    spaces: Namespaces,
    tmp_path: Path,
    logs: LogCapture,
    request: pytest.FixtureRequest,
) -> None:
    java = request.getfixturevalue("java_classes") if client == "java" else None
    async with captured(spaces, tmp_path, logs) as (stack, sidecar):
        for method, path, body, scope in (
            ("GET", "/v1/invoices", None, "invoices:read"),
            ("POST", "/v1/invoices/42", '{"amount": 1}', "invoices:write"),
        ):
            argv = app_argv(spaces, client, method, f"http://api.saas.example{path}", body, java)
            code, out, err = await run(argv)
            assert code == 0, err
            status, answer = parse_answer(client, out)
            assert status == 200, answer
            payload = json.loads(answer)
            assert payload["method"] == method
            assert payload["path"] == path
            assert payload["caller"] == stack.spiffe_id
            assert payload["scope"] == scope
            seen = stack.saas.requests[-1]
            assert seen.token_claims is not None
            assert seen.proof_claims is not None
            assert seen.token_claims["cnf"]["jkt"] == sidecar.dpop_key.thumbprint
            assert next(v for k, v in seen.headers if k.lower() == "authorization").startswith(
                "DPoP "
            )
            if body:
                assert payload["body_len"] == len(body)
        assert count(sidecar, "sidecar_transparent_connections_total", outcome="routed") >= 2
        assert (
            count(
                sidecar, "sidecar_requests_total", route="saas", method="POST", status_class="2xx"
            )
            == 1
        )
        assert len(stack.saas.requests) == 2  # one each: the AS and the API saw no loop


async def test_passthrough_reaches_a_server_in_the_namespace_unchanged(
    spaces: Namespaces, tmp_path: Path, logs: LogCapture
) -> None:
    async with captured(spaces, tmp_path, logs) as (stack, sidecar), PeerServer(spaces) as peer:
        url = f"http://unrouted.example:{PEER_PORT}/hello?x=1"
        code, out, err = await run(curl(spaces, url, "-H", "X-App: 1"))
        assert code == 0, err
        status, echoed = split_curl(out)
        assert status == 200
        assert echoed.startswith(
            f"GET /hello?x=1 HTTP/1.1\r\nHost: unrouted.example:{PEER_PORT}\r\n"
        )
        assert "authorization" not in echoed.lower()
        assert "dpop" not in echoed.lower()
        assert peer.received == [echoed.encode()]  # byte for byte, once: no loop
        port = str(PEER_PORT)
        assert (
            count(sidecar, "sidecar_transparent_unmatched_total", action="passthrough", port=port)
            == 1
        )
        assert count(sidecar, "sidecar_transparent_connections_total", outcome="passthrough") == 1
        assert stack.saas.requests == []

        # The sidecar's own uid (0 here) is excluded: its connections go straight out.
        reader, writer = await asyncio.open_connection(spaces.peer_ip, PEER_PORT)
        writer.write(b"GET /direct HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        assert peer.connections == 2
        assert count(sidecar, "sidecar_transparent_connections_total", outcome="passthrough") == 1


async def test_deny_refuses_counts_and_logs_once_per_destination(
    spaces: Namespaces, tmp_path: Path, logs: LogCapture
) -> None:
    async with (
        captured(spaces, tmp_path, logs, unmatched="deny") as (_, sidecar),
        PeerServer(spaces) as peer,
    ):
        for _ in range(2):
            code, out, err = await run(curl(spaces, f"http://unrouted.example:{PEER_PORT}/"))
            assert code == 0, err
            status, answer = split_curl(out)
            assert status == 403
            assert json.loads(answer)["error"] == "forbidden"
        # Not HTTP (TLS with an unrouted SNI): closed without a word.
        code, _, _ = await run(curl(spaces, "https://unrouted.example:8443/", "-k"))
        assert code != 0
        assert peer.connections == 0
        assert (
            count(
                sidecar, "sidecar_transparent_unmatched_total", action="deny", port=str(PEER_PORT)
            )
            == 2
        )
        assert (
            count(sidecar, "sidecar_transparent_unmatched_total", action="deny", port="8443") == 1
        )
        denied = [line for line in logs.lines if "captured connection denied" in line]
        assert len(denied) == 2  # once per destination: :8080 twice, :8443 once


async def test_removing_the_rules_restores_direct_traffic(
    spaces: Namespaces, tmp_path: Path, logs: LogCapture
) -> None:
    async with (
        captured(spaces, tmp_path, logs, unmatched="deny") as (_, sidecar),
        PeerServer(spaces) as peer,
    ):
        url = f"http://unrouted.example:{PEER_PORT}/"
        code, out, _ = await run(curl(spaces, url))
        assert split_curl(out)[0] == 403
        assert peer.connections == 0
        await rules(spaces, "remove")
        code, out, err = await run(curl(spaces, url))
        assert code == 0, err
        assert split_curl(out)[0] == 200
        assert peer.connections == 1
        assert (
            count(
                sidecar, "sidecar_transparent_unmatched_total", action="deny", port=str(PEER_PORT)
            )
            == 1
        )
        await rules(spaces, "install")  # installing twice is harmless; the fixture removes


async def test_a_routed_host_at_an_address_it_does_not_resolve_to_is_refused_when_the_route_says_so(
    spaces: Namespaces, tmp_path: Path, logs: LogCapture
) -> None:
    refuse = {"on_address_mismatch": "refuse"}
    async with captured(spaces, tmp_path, logs, resolves_to="10.231.255.9", destination=refuse) as (
        stack,
        sidecar,
    ):
        code, out, err = await run(curl(spaces, "http://api.saas.example/v1/invoices"))
        assert code == 0, err
        status, answer = split_curl(out)
        assert status == 403, answer
        assert stack.saas.requests == []
        assert (
            count(sidecar, "sidecar_transparent_connections_total", outcome="address_mismatch") == 1
        )
        assert any("does not resolve to" in line for line in logs.lines)


async def test_tls_to_a_tunnel_route_is_relayed_to_the_routes_name(
    spaces: Namespaces, tmp_path: Path, logs: LogCapture
) -> None:
    tunnel = {
        "name": "tunnel",
        "host": "tunnel.example",
        "tunnel": True,
        "tunnel_ports": [PEER_PORT],
    }
    async with captured(spaces, tmp_path, logs, unmatched="deny", extra_destinations=[tunnel]) as (
        _,
        sidecar,
    ):
        async with PeerServer(spaces) as peer:
            # The peer is no TLS server: it keeps the ClientHello bytes it got and hangs up.
            code, _, _ = await run(curl(spaces, f"https://tunnel.example:{PEER_PORT}/", "-k"))
            assert code != 0
        assert peer.connections == 1
        assert peer.received[0][:1] == b"\x16"
        assert b"tunnel.example" in peer.received[0]
        assert count(sidecar, "sidecar_transparent_connections_total", outcome="tunnel") == 1


async def test_ipv6_is_captured_too(spaces: Namespaces, tmp_path: Path, logs: LogCapture) -> None:
    async with captured(spaces, tmp_path, logs, ipv6=True) as (stack, sidecar):
        assert len(sidecar.transparent_addresses) == 2  # 127.0.0.1 and ::1
        async with PeerServer(spaces, ipv6=True) as peer:
            url = f"http://unrouted6.example:{PEER_PORT}/six"
            code, out, err = await run(curl(spaces, url, "-6"))
            assert code == 0, err
            status, echoed = split_curl(out)
            assert status == 200
            assert echoed.startswith("GET /six HTTP/1.1\r\n")
            assert peer.received == [echoed.encode()]
        # Routed over IPv6: the Host names the route, the sidecar dials the route's upstream
        # (and logs that api.saas.example does not resolve to this address).
        url = f"http://[{spaces.peer_ip6}]/v1/invoices"
        code, out, err = await run(curl(spaces, url, "-H", "Host: api.saas.example"))
        assert code == 0, err
        status, answer = split_curl(out)
        assert status == 200, answer
        assert json.loads(answer)["caller"] == stack.spiffe_id
        assert stack.saas.requests[-1].token_claims is not None
        assert count(sidecar, "sidecar_transparent_connections_total", outcome="passthrough") == 1
        assert count(sidecar, "sidecar_transparent_connections_total", outcome="routed") == 1
        assert any("does not resolve to" in line for line in logs.lines)


BANNER_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as sock:
    banner = sock.recv(100)
    sock.sendall(b"QUIT\\r\\n")
    print(banner.decode().strip(), sock.recv(100).decode().strip())
"""


async def test_a_server_first_protocol_passes_through_after_the_peek_timeout(
    spaces: Namespaces, tmp_path: Path, logs: LogCapture
) -> None:
    """SMTP-like: the server speaks first, the app waits for it: nothing to peek at."""

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer ready\r\n")
        line = await reader.readline()
        writer.write(b"221 bye " + line.strip() + b"\r\n")
        await writer.drain()
        writer.close()

    sock = spaces.listen_in_peer(2525)
    server = await asyncio.start_server(banner, sock=sock)
    try:
        async with captured(spaces, tmp_path, logs, peek_timeout=0.2) as (_, sidecar):
            argv = spaces.app_command(
                "/usr/bin/python3", "-I", "-c", BANNER_CLIENT, "unrouted.example", "2525"
            )
            code, out, err = await run(argv)
            assert code == 0, err
            assert out.strip() == "220 peer ready 221 bye QUIT"
            passed = count(
                sidecar, "sidecar_transparent_unmatched_total", action="passthrough", port="2525"
            )
            assert passed == 1
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def trust_dir() -> Iterator[Path]:
    """Where the pod CA is exported: readable by the app's uid (as the injected volume is)."""
    made = Path(tempfile.mkdtemp(prefix="sidecar-trust-"))
    made.chmod(0o755)
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


@pytest.mark.parametrize("client", ["curl", "urllib", "java"])
async def test_https_with_interception_and_the_pod_ca_trusted(
    client: str,
    spaces: Namespaces,
    tmp_path: Path,
    logs: LogCapture,
    trust_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    java = request.getfixturevalue("java_classes") if client == "java" else None
    intercept = {"ca_dir": str(tmp_path / "ca"), "export_dir": str(trust_dir)}
    destination = {"intercept": True}
    async with captured(spaces, tmp_path, logs, intercept=intercept, destination=destination) as (
        stack,
        sidecar,
    ):
        url = "https://api.saas.example/v1/invoices"
        if client == "curl":
            argv = curl(spaces, url, "--cacert", str(trust_dir / "ca.pem"))
        elif client == "urllib":
            argv = spaces.app_command(
                "/usr/bin/python3", "-I", "-c", URLLIB_TLS, "GET", url, str(trust_dir / "ca.pem")
            )
        else:
            assert java is not None
            store = trust_dir / "truststore.p12"
            argv = spaces.app_command(
                "java", "-Duser.home=/tmp", f"-Djavax.net.ssl.trustStore={store}",
                "-Djavax.net.ssl.trustStoreType=PKCS12", "-cp", str(java), "Plain", "GET", url,
            )  # fmt: skip
        code, out, err = await run(argv)
        assert code == 0, err
        status, answer = parse_answer(client, out)
        assert status == 200, answer
        payload = json.loads(answer)
        assert payload["caller"] == stack.spiffe_id
        assert payload["scope"] == "invoices:read"
        seen = stack.saas.requests[-1]
        assert seen.token_claims is not None
        assert seen.token_claims["cnf"]["jkt"] == sidecar.dpop_key.thumbprint
        assert count(sidecar, "sidecar_transparent_connections_total", outcome="intercepted") == 1
        assert count(sidecar, "sidecar_intercept_handshakes_total", route="saas", outcome="ok") == 1


async def test_captured_tls_that_does_not_trust_the_pod_ca_is_counted_and_sends_nothing(
    spaces: Namespaces, tmp_path: Path, logs: LogCapture, trust_dir: Path
) -> None:
    intercept = {"ca_dir": str(tmp_path / "ca"), "export_dir": str(trust_dir)}
    async with captured(
        spaces, tmp_path, logs, intercept=intercept, destination={"intercept": True}
    ) as (stack, sidecar):
        code, _, _ = await run(curl(spaces, "https://api.saas.example/v1/invoices"))
        assert code != 0  # curl does not trust the pod CA
        assert stack.saas.requests == []
        assert (
            count(sidecar, "sidecar_transparent_connections_total", outcome="handshake_failed") == 1
        )
