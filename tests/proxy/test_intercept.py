"""Apps that call https://: CONNECT to an intercepting route, TLS with the pod CA, the same
data path as plain requests. Real clients (curl, requests, urllib, httpx, Node, Java) on
loopback, the real dev stack behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.proxy.intercept.ca import EXPORT_BUNDLE, EXPORT_CA, EXPORT_TRUSTSTORE
from sidecar.runtime import Sidecar
from tests.conftest import LogCapture, running_sidecar

CLIENTS = Path(__file__).parent / "clients"
URL = f"https://{SAAS_HOST}/v1/invoices"
CLIENT_TIMEOUT = 90.0  # seconds for one client process (a JVM on a loaded machine)


def intercepting(stack: DevStack, tmp: Path, **extra: Any) -> dict[str, Any]:
    return {
        "destination": {"intercept": True},
        "intercept": {"ca_dir": str(tmp / "ca"), "export_dir": str(tmp / "trust"), **extra},
    }


@contextlib.asynccontextmanager
async def intercept_sidecar(stack: DevStack, tmp: Path, **extra: Any) -> AsyncIterator[Sidecar]:
    async with running_sidecar(stack, **intercepting(stack, tmp, **extra)) as sidecar:
        yield sidecar


def app_env(sidecar: Sidecar, trust: Path | None, **more: str) -> dict[str, str]:
    """The variables `sidecar inject` gives an app container (and nothing of ours)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    for key in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env.pop(key, None)
    proxy = f"http://{sidecar.proxy_address}"
    env.update({"HTTPS_PROXY": proxy, "https_proxy": proxy, "NO_PROXY": "", "no_proxy": ""})
    if trust is not None:
        bundle = str(trust / EXPORT_BUNDLE)
        env.update(
            {
                "SSL_CERT_FILE": bundle,
                "REQUESTS_CA_BUNDLE": bundle,
                "CURL_CA_BUNDLE": bundle,
                "NODE_EXTRA_CA_CERTS": str(trust / EXPORT_CA),
                "JAVA_TOOL_OPTIONS": f"-Djavax.net.ssl.trustStore={trust / EXPORT_TRUSTSTORE} "
                "-Djavax.net.ssl.trustStoreType=PKCS12",
            }
        )
    env.update(more)
    return env


async def run(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CLIENT_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, out.decode(), err.decode()


@pytest.fixture(scope="module")
def java_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("javac") is None:
        pytest.skip("no JDK")
    out = tmp_path_factory.mktemp("java")
    import subprocess

    subprocess.run(  # noqa: S603 - a fixed tool on a file of ours
        ["javac", "-d", str(out), str(CLIENTS / "JavaClient.java")],  # noqa: S607
        check=True,
        timeout=CLIENT_TIMEOUT,
    )
    return out


def client_command(kind: str, method: str, sidecar: Sidecar, java: Path | None) -> list[str]:
    if kind == "curl":
        command = ["curl", "-sS", "-X", method, URL, "-w", "\n%{http_code}"]
        if method == "POST":
            command += ["-H", "Content-Type: application/json", "--data", '{"customer": "ACME"}']
        return command
    if kind == "node":
        return ["node", str(CLIENTS / "node_client.js"), method, URL]
    if kind == "node-fetch":
        return ["node", str(CLIENTS / "node_fetch_client.mjs"), method, URL]
    if kind == "java":
        assert java is not None
        address = sidecar.proxy_address
        assert address is not None
        proxy = [address.host, str(address.port)]
        return ["java", "-cp", str(java), "JavaClient", method, URL, *proxy]
    return [sys.executable, str(CLIENTS / "py_client.py"), kind, method, URL]


def status_and_body(kind: str, out: str) -> tuple[int, dict[str, Any]]:
    lines = out.strip().splitlines()
    if kind == "curl":  # body, then the status (-w)
        return int(lines[-1]), json.loads("\n".join(lines[:-1]))
    return int(lines[0]), json.loads("\n".join(lines[1:]))


KINDS = ["curl", "requests", "urllib", "httpx", "node", "node-fetch", "java"]
# undici (fetch + ProxyAgent) comes with the project's Node peers (`make node`).
UNDICI = Path(__file__).resolve().parents[1] / "interop" / "oidc" / "node_modules"


@pytest.mark.parametrize("kind", KINDS)
async def test_real_clients_get_and_post_https_through_the_sidecar(
    kind: str, stack: DevStack, tmp_path: Path, logs: LogCapture, request: pytest.FixtureRequest
) -> None:
    tool = {"curl": "curl", "node": "node", "node-fetch": "node", "java": "java"}
    if shutil.which(tool.get(kind, "python3")) is None:
        pytest.skip(f"{kind} is not installed")
    if kind == "node-fetch" and not (UNDICI / "undici").is_dir():
        pytest.skip("undici is not installed (make node)")
    java = request.getfixturevalue("java_classes") if kind == "java" else None
    async with intercept_sidecar(stack, tmp_path) as sidecar:
        env = app_env(sidecar, tmp_path / "trust")
        env["UNDICI_DIR"] = str(UNDICI)
        for method, scope in (("GET", "invoices:read"), ("POST", "invoices:write")):
            code, out, err = await run(client_command(kind, method, sidecar, java), env)
            assert code == 0, err
            status, body = status_and_body(kind, out)
            assert status == 200, out
            assert body["ok"] is True
            assert body["method"] == method
            seen = stack.saas.requests[-1]
            assert seen.method == method
            assert seen.raw_path == "/v1/invoices"
            assert seen.token_claims is not None
            assert seen.token_claims["scope"] == scope
            assert seen.token_claims["cnf"]["jkt"] == sidecar.dpop_key.thumbprint
            assert seen.proof_claims is not None
            assert seen.proof_claims["htm"] == method
            assert seen.proof_claims["htu"] == f"{stack.saas.base_url}/v1/invoices"
            assert dict(seen.headers)["Authorization"].startswith("DPoP ")
        metrics = sidecar.metrics.exposition().decode()
    assert 'sidecar_intercept_handshakes_total{outcome="ok",route="saas"}' in metrics
    assert 'sidecar_intercepted_requests_total{route="saas"} 2.0' in metrics
    audited = [r for r in logs.records if r.name == "sidecar.audit" and r.__dict__.get("path")]
    assert {r.__dict__["method"] for r in audited} == {"GET", "POST"}
    assert all(r.__dict__.get("intercepted") is True for r in audited)


# -- raw TLS through CONNECT ------------------------------------------------------------------


async def connect_tls(
    sidecar: Sidecar, trust: Path | None, *, sni: str = SAAS_HOST, authority: str = SAAS_HOST
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """CONNECT, then a TLS handshake as an app would make it (``trust``: the exported CA)."""
    address = sidecar.proxy_address
    assert address is not None
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(f"CONNECT {authority}:443 HTTP/1.1\r\nHost: {authority}:443\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    context = ssl.create_default_context(cafile=str(trust / EXPORT_CA) if trust else None)
    context.set_alpn_protocols(["h2", "http/1.1"])
    await asyncio.wait_for(writer.start_tls(context, server_hostname=sni), 10)
    return reader, writer


async def read_answers(reader: asyncio.StreamReader, count: int) -> list[tuple[int, bytes]]:
    """``count`` answers with a Content-Length, in order."""
    answers = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        answers.append((status, await asyncio.wait_for(reader.readexactly(length), 10)))
    return answers


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def test_keep_alive_pipelined_chunked_and_expect_continue_inside_tls(
    stack: DevStack, tmp_path: Path
) -> None:
    async with intercept_sidecar(stack, tmp_path) as sidecar:
        reader, writer = await connect_tls(sidecar, tmp_path / "trust")
        try:
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
            assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            host = f"Host: {SAAS_HOST}\r\n"
            writer.write(
                f"GET /v1/invoices?n=1 HTTP/1.1\r\n{host}\r\n"
                f"GET /v1/invoices?n=2 HTTP/1.1\r\n{host}\r\n"
                f"POST /v1/invoices HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n"
                "5\r\nhello\r\n0\r\n\r\n".encode()
            )
            answers = await read_answers(reader, 3)
            assert [s for s, _ in answers] == [200, 200, 200]
            assert [json.loads(b)["path"] for (b,) in [(b,) for _, b in answers]] == [
                "/v1/invoices?n=1",
                "/v1/invoices?n=2",
                "/v1/invoices",
            ]
            assert json.loads(answers[2][1])["body_len"] == 5
            writer.write(
                f"POST /v1/invoices HTTP/1.1\r\n{host}Content-Length: 4\r\n"
                "Expect: 100-continue\r\n\r\n".encode()
            )
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert interim.startswith(b"HTTP/1.1 100 ")
            writer.write(b"ABCD")
            [(status, body)] = await read_answers(reader, 1)
            assert status == 200
            assert json.loads(body)["body_len"] == 4
        finally:
            await close(writer)
    scopes = [r.token_claims["scope"] for r in stack.saas.requests if r.token_claims]
    assert scopes == ["invoices:read", "invoices:read", "invoices:write", "invoices:write"]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        # One host per CONNECT: a request for another one on the same connection is refused.
        (b"GET /v1/invoices HTTP/1.1\r\nHost: evil.example\r\n\r\n", 421),
        (b"GET /v1/invoices HTTP/1.1\r\nHost: api.saas.example:8443\r\n\r\n", 421),
        (b"GET https://evil.example/v1/invoices HTTP/1.1\r\nHost: api.saas.example\r\n\r\n", 421),
        (b"GET /v1/invoices HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1/invoices HTTP/1.1\r\nHost: api.saas.example\r\nHost: x.example\r\n\r\n", 400),
        (b"GET /v1/../admin HTTP/1.1\r\nHost: api.saas.example\r\n\r\n", 400),
        (b"CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: api.saas.example\r\n\r\n", 400),
        # The listener's and routing's strictness (#15) hold inside TLS: one parser, one path.
        (b"GET /v1/%2e%2e/admin HTTP/1.1\r\nHost: api.saas.example\r\n\r\n", 400),
        (b"GET /v1/invoices HTTP/1.1\r\nHost: api.saas.example\r\nX_Forwarded: 1\r\n\r\n", 400),
        (
            b"GET /v1/invoices HTTP/1.1\r\nHost: api.saas.example\r\n"
            b"X-HTTP-Method-Override: DELETE\r\n\r\n",
            400,
        ),
        (b"GET /v1/invoices HTTP/2.0\r\nHost: api.saas.example\r\n\r\n", 400),
        (b"GET /v1/invoices HTTP/1.1\r\nHost: 127.1\r\n\r\n", 400),
    ],
)
async def test_inside_tls_the_connect_host_is_the_only_host(
    head: bytes, status: int, stack: DevStack, tmp_path: Path
) -> None:
    async with intercept_sidecar(stack, tmp_path) as sidecar:
        reader, writer = await connect_tls(sidecar, tmp_path / "trust")
        try:
            writer.write(head)
            answer = await asyncio.wait_for(reader.read(65536), 10)
        finally:
            await close(writer)
    assert answer.split(b" ", 2)[1] == str(status).encode(), answer
    assert stack.saas.requests == []
    assert stack.auth_server.token_requests == []


async def test_an_sni_naming_another_host_is_refused_with_an_audit_line(
    stack: DevStack, tmp_path: Path, logs: LogCapture
) -> None:
    async with intercept_sidecar(stack, tmp_path) as sidecar:
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):  # the alert arrives
            await connect_tls(sidecar, tmp_path / "trust", sni="evil.example")
        metrics = sidecar.metrics.exposition().decode()
    assert 'sidecar_intercept_handshakes_total{outcome="sni_mismatch",route="saas"} 1.0' in metrics
    refused = [r for r in logs.records if r.__dict__.get("event") == "intercept_refused"]
    assert [(r.__dict__["host"], r.__dict__["sni"]) for r in refused] == [
        (SAAS_HOST, "evil.example")
    ]
    assert stack.saas.requests == []


async def test_concurrent_handshakes_are_judged_one_by_one_and_no_sni_is_refused(
    stack: DevStack, tmp_path: Path
) -> None:
    async def without_sni() -> None:
        address = sidecar.proxy_address
        assert address is not None
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(f"CONNECT {SAAS_HOST}:443 HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n".encode())
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        context = ssl.create_default_context(cafile=str(tmp_path / "trust" / EXPORT_CA))
        context.check_hostname = False
        await asyncio.wait_for(writer.start_tls(context, server_hostname=None), 10)

    async def good() -> int:
        reader, writer = await connect_tls(sidecar, tmp_path / "trust")
        writer.write(f"GET /v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n".encode())
        [(status, _)] = await read_answers(reader, 1)
        await close(writer)
        return status

    async with intercept_sidecar(stack, tmp_path) as sidecar:
        results = await asyncio.gather(
            good(),
            connect_tls(sidecar, tmp_path / "trust", sni="evil.example"),
            without_sni(),
            good(),
            return_exceptions=True,
        )
        metrics = sidecar.metrics.exposition().decode()
    assert results[0] == results[3] == 200
    assert isinstance(results[1], ssl.SSLError)
    assert isinstance(results[2], ssl.SSLError)
    assert "UNRECOGNIZED_NAME" in str(results[2])
    assert 'sidecar_intercept_handshakes_total{outcome="ok",route="saas"} 2.0' in metrics
    assert 'sidecar_intercept_handshakes_total{outcome="sni_mismatch",route="saas"} 2.0' in metrics


@pytest.mark.parametrize(
    "hello",
    [
        b"GET /v1/invoices HTTP/1.1\r\nHost: api.saas.example\r\n\r\n",  # plaintext in TLS
        b"\x16\x03\x01\x00\x04\x01\x00\x00\x00",  # a ClientHello with nothing in it
        b"\x15\x03\x03\x00\x02\x02\x28",  # an alert instead of a ClientHello
    ],
)
async def test_what_is_not_a_tls_handshake_is_refused_and_counted(
    hello: bytes, stack: DevStack, tmp_path: Path
) -> None:
    async with intercept_sidecar(stack, tmp_path) as sidecar:
        address = sidecar.proxy_address
        assert address is not None
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(f"CONNECT {SAAS_HOST}:443 HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n".encode())
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(hello)
        rest = await asyncio.wait_for(reader.read(65536), 10)  # then the connection closes
        await close(writer)
        metrics = sidecar.metrics.exposition().decode()
    assert b"HTTP/1.1" not in rest  # nothing was answered in plaintext
    assert 'sidecar_intercept_handshakes_total{outcome="protocol",route="saas"} 1.0' in metrics
    assert stack.saas.requests == []


async def test_a_client_that_does_not_trust_the_ca_fails_and_is_told_which_variable(
    stack: DevStack, tmp_path: Path, logs: LogCapture
) -> None:
    async with intercept_sidecar(stack, tmp_path) as sidecar:
        # curl with the system CAs only: the handshake fails at the client (unknown CA).
        code, _, err = await run(["curl", "-sS", URL], app_env(sidecar, None))
        assert code == 60, err
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect_tls(sidecar, None)
        metrics = sidecar.metrics.exposition().decode()
    # curl (OpenSSL) sends its unknown_ca alert; an asyncio client hangs up without one.
    assert 'sidecar_intercept_handshakes_total{outcome="unknown_ca",route="saas"} 1.0' in metrics
    assert 'sidecar_intercept_handshakes_total{outcome="closed",route="saas"} 1.0' in metrics
    failed = [r for r in logs.records if r.getMessage().startswith("TLS handshake with the app")]
    assert [r.__dict__["reason"] for r in failed] == ["unknown_ca", "closed"]
    for record in failed:  # the operator is told which variable each runtime reads
        for variable in ("CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
            assert variable in record.__dict__["detail"]
    assert stack.saas.requests == []
    assert stack.auth_server.token_requests == []


async def test_connect_to_a_credential_route_that_does_not_intercept_is_still_refused(
    stack: DevStack, sidecar: Sidecar
) -> None:
    address = sidecar.proxy_address
    assert address is not None
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(f"CONNECT {SAAS_HOST}:443 HTTP/1.1\r\nHost: {SAAS_HOST}:443\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(65536), 10)
    await close(writer)
    assert answer.split(b" ", 2)[1] == b"403"
    assert b"intercept: true" in answer


async def test_bytes_sent_before_the_connect_is_answered_are_refused(
    stack: DevStack, tmp_path: Path
) -> None:
    """A ClientHello pipelined behind the CONNECT head would be lost to the handshake."""
    async with intercept_sidecar(stack, tmp_path) as sidecar:
        address = sidecar.proxy_address
        assert address is not None
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(
            f"CONNECT {SAAS_HOST}:443 HTTP/1.1\r\nHost: {SAAS_HOST}:443\r\n\r\n".encode()
            + b"\x16\x03\x01\x00\x05hello"
        )
        answer = await asyncio.wait_for(reader.read(65536), 10)
        await close(writer)
    assert answer.split(b" ", 2)[1] == b"400"
    assert stack.saas.requests == []


async def test_an_intercepting_route_takes_port_443_only(stack: DevStack, tmp_path: Path) -> None:
    async with intercept_sidecar(stack, tmp_path) as sidecar:
        address = sidecar.proxy_address
        assert address is not None
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(f"CONNECT {SAAS_HOST}:8443 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(65536), 10)
        await close(writer)
    assert answer.split(b" ", 2)[1] == b"403"


async def test_a_sidecar_restart_keeps_the_ca_and_clients_keep_working(
    stack: DevStack, tmp_path: Path
) -> None:
    async with intercept_sidecar(stack, tmp_path) as first:
        assert first.intercept is not None
        fingerprint = first.intercept.ca.fingerprint
        trusted = (tmp_path / "trust" / EXPORT_CA).read_bytes()
        # The app keeps what it loaded at its start: a copy outside the export directory.
        app_copy = tmp_path / "app-loaded-at-start"
        app_copy.mkdir()
        (app_copy / EXPORT_CA).write_bytes(trusted)
    assert oct((tmp_path / "ca" / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
    async with intercept_sidecar(stack, tmp_path) as second:
        assert second.intercept is not None
        assert second.intercept.ca.fingerprint == fingerprint
        assert (tmp_path / "trust" / EXPORT_CA).read_bytes() == trusted
        reader, writer = await connect_tls(second, app_copy)
        try:
            writer.write(f"GET /v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n".encode())
            [(status, _)] = await read_answers(reader, 1)
        finally:
            await close(writer)
    assert status == 200


async def test_a_host_added_by_a_reload_that_the_ca_does_not_cover_is_refused(
    stack: DevStack, tmp_path: Path
) -> None:
    """The app trusts the CA it loaded at start: the sidecar cannot widen it on a reload."""
    from sidecar import config
    from sidecar.runtime import build_snapshot

    async with intercept_sidecar(stack, tmp_path) as sidecar:
        doc = stack.sidecar_config(**intercepting(stack, tmp_path))
        doc["destinations"].append({**doc["destinations"][0], "name": "new", "host": "new.example"})
        sidecar._apply(await asyncio.to_thread(build_snapshot, config.parse(doc)))
        address = sidecar.proxy_address
        assert address is not None
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(b"CONNECT new.example:443 HTTP/1.1\r\nHost: new.example:443\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(65536), 10)
        await close(writer)
        assert answer.split(b" ", 2)[1] == b"403"
        assert b"restart the pod" in answer
        # The hosts it covers keep working.
        reader, writer = await connect_tls(sidecar, tmp_path / "trust")
        writer.write(f"GET /v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n".encode())
        [(status, _)] = await read_answers(reader, 1)
        await close(writer)
    assert status == 200


async def test_the_dpop_nonce_retry_works_inside_intercepted_tls(
    tmp_path: Path, logs: LogCapture
) -> None:
    """Retries are the Forwarder's: an intercepted request gets them like a plain one."""
    from sidecar.devstack.stack import dev_stack
    from tests.conftest import assert_no_secrets

    async with dev_stack(tmp_path, saas={"require_nonce": True}) as stack:
        async with intercept_sidecar(stack, tmp_path) as sidecar:
            reader, writer = await connect_tls(sidecar, tmp_path / "trust")
            body = b'{"customer": "ACME"}'
            writer.write(
                f"POST /v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            [(status, answer)] = await read_answers(reader, 1)
            await close(writer)
            metrics = sidecar.metrics.exposition().decode()
        assert status == 200, answer
        assert [r.status for r in stack.saas.requests] == [401, 200]
        assert stack.saas.requests[-1].proof_claims is not None
        assert "nonce" in stack.saas.requests[-1].proof_claims
        assert 'sidecar_upstream_retries_total{reason="use_dpop_nonce",route="saas"} 1.0' in metrics
        assert_no_secrets(logs.text(), stack.secrets())
