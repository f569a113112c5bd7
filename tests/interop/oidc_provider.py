"""Run oidc-provider (tests/interop/oidc/server.mjs) on loopback for the interop tests.

The provider is a real third-party authorization server on Node.js: the sidecar talks to it
over HTTPS exactly as it would to a production AS. ``make test`` installs it (``make node``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.devstack.stack import DevStack

PACKAGE_DIR = Path(__file__).parent / "oidc"
SERVER = PACKAGE_DIR / "server.mjs"
START_TIMEOUT = 60.0


def require_node() -> str:
    """The node binary, once ``make node`` has installed oidc-provider; else skip (fail in CI)."""
    node = shutil.which("node")
    installed = (PACKAGE_DIR / "node_modules" / "oidc-provider").is_dir()
    if node and installed:
        return node
    reason = "oidc-provider is not installed: run `make node` (make test does)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _signing_key() -> tuple[dict[str, Any], dict[str, Any]]:
    """A fresh ES256 signing key for the provider: (private JWK, public JWKS)."""
    key = ec.generate_private_key(ec.SECP256R1())
    kid = "interop-es256"
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    for jwk in (private, public):
        jwk.update(kid=kid, alg="ES256", use="sig")
    return private, {"keys": [public]}


@dataclass
class OidcProvider:
    issuer: str
    public_jwks: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._arrived.set()

    async def wait_for_grants(self, count: int, grant_type: str | None = None) -> None:
        """Wait (bounded) until the provider has logged ``count`` granted token requests.

        The provider logs a grant before it answers, but its log reaches us through a pipe:
        this closes that gap without sleeping.
        """
        async with asyncio.timeout(10):
            while len(self.grants(grant_type)) < count:
                self._arrived.clear()
                await self._arrived.wait()

    def grants(self, grant_type: str | None = None) -> list[dict[str, Any]]:
        """Token requests the provider granted (optionally of one grant type)."""
        return [
            e
            for e in self.events
            if e["event"] == "token" and grant_type in (None, e["grant_type"])
        ]

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] in ("token_error", "server_error")]


@contextlib.asynccontextmanager
async def oidc_provider(
    stack: DevStack,
    *,
    clients: Iterable[Mapping[str, Any]],
    resources: Mapping[str, Mapping[str, Any]],
    require_nonce: bool = True,
) -> AsyncIterator[OidcProvider]:
    """Start oidc-provider with TLS from the stack's dev CA and the stack's SPIFFE trust domain."""
    node = require_node()
    tls = stack.ca.issue_server("localhost", "127.0.0.1")
    private, public = _signing_key()
    document = {
        "tls": {
            "cert": tls.cert_pem.decode(),
            "key": tls.key_pem.decode(),
            "client_ca": stack.trust_domain.x509_bundle_pem.decode(),
        },
        "signing_jwks": {"keys": [private]},
        "spiffe_jwks": stack.trust_domain.jwks(),
        "trust_domain": stack.trust_domain.name,
        "clients": list(clients),
        "resources": {url: dict(info) for url, info in resources.items()},
        "scopes": sorted({s for info in resources.values() for s in info["scopes"]}),
        "dpop_require_nonce": require_nonce,
    }
    config_path = stack.workdir / "oidc-provider.json"
    config_path.touch(mode=0o600)
    config_path.write_text(json.dumps(document))
    process = await asyncio.create_subprocess_exec(
        node,
        str(SERVER),
        str(config_path),
        cwd=PACKAGE_DIR,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_ENV": "production", "NO_COLOR": "1"},
    )
    assert process.stdout is not None
    assert process.stdin is not None
    try:
        ready = await asyncio.wait_for(_ready(process.stdout), START_TIMEOUT)
        provider = OidcProvider(issuer=ready["issuer"], public_jwks=public)
        reader = asyncio.create_task(_collect(process.stdout, provider))
        try:
            yield provider
        finally:
            reader.cancel()
    finally:
        if process.returncode is None:
            process.stdin.close()  # the server exits when stdin closes
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _ready(stdout: asyncio.StreamReader) -> dict[str, Any]:
    while line := await stdout.readline():
        event = json.loads(line)
        if event.get("event") == "ready":
            return dict(event)
    raise RuntimeError("oidc-provider exited before it was ready (see stderr above)")


async def _collect(stdout: asyncio.StreamReader, provider: OidcProvider) -> None:
    while line := await stdout.readline():
        with contextlib.suppress(ValueError):
            provider.add(json.loads(line))
