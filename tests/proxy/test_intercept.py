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
async def intercept_sidecar(
    stack: DevStack, tmp: Path, **extra: Any
) -> AsyncIterator[Sidecar]:
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
    if kind == "java":
        assert java is not None and sidecar.proxy_address is not None
        address = sidecar.proxy_address
        return ["java", "-cp", str(java), "JavaClient", method, URL, address.host, str(address.port)]
    return [sys.executable, str(CLIENTS / "py_client.py"), kind, method, URL]


def status_and_body(kind: str, out: str) -> tuple[int, dict[str, Any]]:
    lines = out.strip().splitlines()
    if kind == "curl":  # body, then the status (-w)
        return int(lines[-1]), json.loads("\n".join(lines[:-1]))
    return int(lines[0]), json.loads("\n".join(lines[1:]))


KINDS = ["curl", "requests", "urllib", "httpx", "node", "java"]


@pytest.mark.parametrize("kind", KINDS)
async def test_real_clients_get_and_post_https_through_the_sidecar(
    kind: str, stack: DevStack, tmp_path: Path, logs: LogCapture, request: pytest.FixtureRequest
) -> None:
    if shutil.which({"curl": "curl", "node": "node", "java": "java"}.get(kind, "python3")) is None:
        pytest.skip(f"{kind} is not installed")
    java = request.getfixturevalue("java_classes") if kind == "java" else None
    async with intercept_sidecar(stack, tmp_path) as sidecar:
        env = app_env(sidecar, tmp_path / "trust")
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
