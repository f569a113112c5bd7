"""DEVELOPMENT ONLY: the whole dev stack in one object, for the demo and the test suite.

A dev CA for loopback TLS, a SPIFFE trust domain, the Workload API on a unix socket, the
authorization server and the "SaaS" API, all started together, plus the sidecar config that
routes ``api.saas.example`` to that SaaS API.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.devstack.auth_server import DevAuthServer
from sidecar.devstack.pki import DevCA, TrustDomain
from sidecar.devstack.saas_api import DevSaasApi
from sidecar.devstack.workload_api import DevWorkloadApi

SAAS_HOST = "api.saas.example"
SAAS_RESOURCE = "https://api.saas.example"
SPIFFE_ID = "spiffe://example.org/ns/billing/sa/legacy-invoicer"
SAAS_SCOPE_RULES = (
    ("GET", "/v1/invoices", "invoices:read"),
    ("POST", "/v1/invoices", "invoices:write"),
)


@dataclass
class DevStack:
    workdir: Path
    ca: DevCA
    ca_file: Path
    trust_domain: TrustDomain
    workload_api: DevWorkloadApi
    auth_server: DevAuthServer
    saas: DevSaasApi

    @property
    def spiffe_id(self) -> str:
        return self.workload_api.spiffe_id

    def secrets(self) -> list[str]:
        """Every credential the stack handed out: the suite checks none reached a log."""
        proofs = [v for seen in self.saas.requests for k, v in seen.headers if k.lower() == "dpop"]
        return [
            *self.workload_api.jwt_svids_issued,
            *self.auth_server.issued_tokens,
            *self.auth_server.proofs_seen,
            *proofs,
        ]

    def sidecar_config(self, **overrides: Any) -> dict[str, Any]:
        """A sidecar config document (see config/README.md) for this stack, on free ports."""
        server: dict[str, Any] = {
            "issuer": self.auth_server.issuer,
            "ca_file": str(self.ca_file),
            "client_auth": "jwt_svid",
            "grant": "client_credentials",
            "dpop": True,
        }
        server.update(overrides.pop("authorization_server", {}))
        destination: dict[str, Any] = {
            "name": "saas",
            "host": SAAS_HOST,
            "upstream": self.saas.base_url,
            "authorization_server": "dev",
            "resource": SAAS_RESOURCE,
            "ca_file": str(self.ca_file),
            "allow_private": True,  # the dev SaaS API is on loopback
            "scopes": {
                "default": ["invoices:read"],
                "rules": [
                    {
                        "methods": ["POST", "PUT", "PATCH", "DELETE"],
                        "paths": ["/v1/invoices/**"],
                        "scopes": ["invoices:write"],
                    },
                ],
            },
        }
        destination.update(overrides.pop("destination", {}))
        doc: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
            "spiffe": {"socket": self.workload_api.address},
            "authorization_servers": {"dev": server},
            "destinations": [destination],
            # Tests count token requests one by one: no start-up prefetch unless asked for.
            "tokens": {"prefetch": False},
        }
        doc.update(overrides)
        return doc


@contextlib.asynccontextmanager
async def dev_stack(
    workdir: Path | None = None,
    *,
    spiffe_id: str = SPIFFE_ID,
    auth_server: Mapping[str, Any] | None = None,
    saas: Mapping[str, Any] | None = None,
    workload_api: Mapping[str, Any] | None = None,
) -> AsyncIterator[DevStack]:
    """Start the dev stack; everything is stopped and the socket removed on exit."""
    # Unix socket paths are limited to ~107 bytes: keep the socket in a short private directory.
    socket_dir = Path(tempfile.mkdtemp(prefix="sidecar-"))
    workdir = workdir or socket_dir
    ca = DevCA()
    ca_file = ca.write_ca(workdir / "dev-ca.pem")
    trust_domain = TrustDomain("example.org")
    wlapi = DevWorkloadApi(
        trust_domain, spiffe_id, socket_dir / "agent.sock", **dict(workload_api or {})
    )
    wlapi.start()
    try:
        tls = ca.issue_server("localhost", "127.0.0.1", "::1")
        # The AS accepts (does not require) X.509-SVIDs as client certificates: RFC 8705.
        as_tls = tls.server_context(client_ca_pem=trust_domain.x509_bundle_pem)
        async with DevAuthServer(
            trust_jwks=trust_domain.jwks,
            ssl_context=as_tls,
            **dict(auth_server or {}),
        ) as as_server:
            saas_options: dict[str, Any] = {"scope_rules": SAAS_SCOPE_RULES, **dict(saas or {})}
            async with DevSaasApi(
                issuer=as_server.issuer,
                as_jwks=as_server.jwks,
                audience=SAAS_RESOURCE,
                ssl_context=tls.server_context(),
                **saas_options,
            ) as saas_api:
                yield DevStack(workdir, ca, ca_file, trust_domain, wlapi, as_server, saas_api)
    finally:
        wlapi.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
