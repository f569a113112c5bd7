"""Run the pinned Keycloak (built by `make keycloak`) on loopback for the interop tests.

One Keycloak serves the whole test run: it is started as soon as collection shows a Keycloak
test (see conftest.py), and waited for only when the first one needs it. It listens on
127.0.0.1 with TLS from a run-wide test CA, HTTP off, in-memory H2, a local cache (no
clustering: no JGroups listener), and imports ``realm.json`` at start. The realm's SPIFFE
identity provider fetches the trust domain's keys from :class:`BundleEndpoint`, a loopback
HTTPS server that serves whichever dev trust domain the current test uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sidecar.devstack.pki import DevCA, TrustDomain
from tests.interop.cache import cache_dir

VERSION = "26.7.3"  # keep in step with KEYCLOAK_VERSION in the Makefile
REALM = "workloads"  # SPIFFE client auth (realm.json)
FEDERATION_REALM = "federation"  # RFC 7523 assertions from an OIDC-style issuer
# Two realms: Keycloak's SPIFFE lookup finds the client by the assertion's subject alone, so
# one SPIFFE ID can name one client per realm.
REALM_FILES = (
    Path(__file__).with_name("realm.json"),
    Path(__file__).with_name("realm-federation.json"),
)
START_TIMEOUT = 240.0  # a cold JVM on two busy cores; typically 15-40 s
# The realm's clients (realm.json): found by the assertion's issuer and subject.
SPIFFE_CLIENT = "legacy-invoicer"
OIDC_CLIENT = "legacy-invoicer-oidc"


def home() -> Path:
    return cache_dir() / f"keycloak-{VERSION}"


def installed() -> bool:
    return (home() / ".sidecar-built").is_file()


def _free_port() -> int:
    # Keycloak needs its port before it starts (--hostname names it): ask the kernel for one.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spiffe_bundle(jwks: Mapping[str, Any], sequence: int) -> dict[str, Any]:
    """A SPIFFE bundle endpoint document (SPIFFE Trust Domain and Bundle §4): the JWT
    authorities as JWKs with ``use: jwt-svid`` and no ``alg``, plus the sequence number and a
    refresh hint, as a SPIRE server publishes them."""
    keys = [{k: v for k, v in key.items() if k != "alg"} for key in jwks.get("keys", [])]
    for key in keys:
        key["use"] = "jwt-svid"
    return {"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": 60}


class BundleEndpoint:
    """HTTPS on 127.0.0.1 in a thread: ``/bundle`` (SPIFFE format) for the realm's SPIFFE
    identity provider and ``/oidc/jwks`` for its OIDC-style issuer (RFC 7523 assertions)."""

    def __init__(self, ca: DevCA) -> None:
        self._lock = threading.Condition()
        self._source: Callable[[], Mapping[str, Any]] = lambda: {"keys": []}
        self.fetches = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with endpoint._lock:
                    jwks = endpoint._source()
                    endpoint.fetches += 1
                    endpoint._lock.notify_all()
                if self.path == "/bundle":
                    doc: Mapping[str, Any] = spiffe_bundle(jwks, len(jwks.get("keys", [])))
                elif self.path == "/oidc/jwks":
                    # An OIDC issuer's JWKS (RFC 7517 §4.2): the same keys, for signatures.
                    doc = {"keys": [{**key, "use": "sig"} for key in jwks.get("keys", [])]}
                else:
                    self.send_error(404)
                    return
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # Keycloak's fetches are counted, not printed

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        tls = ca.issue_server("localhost", "127.0.0.1").server_context()
        self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve(self, trust_domain: TrustDomain) -> None:
        """From now on, publish this trust domain's JWT keys (read live: rotation shows)."""
        with self._lock:
            self._source = trust_domain.jwks


class Keycloak:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ca = DevCA("keycloak interop CA (test only)")
        self.ca_file = self.ca.write_ca(workdir / "keycloak-ca.pem")
        self.bundle = BundleEndpoint(self.ca)
        self.port = _free_port()
        self.base_url = f"https://127.0.0.1:{self.port}"
        self.issuer = self.realm_issuer(REALM)
        self.token_endpoint = f"{self.issuer}/protocol/openid-connect/token"
        self.log_file = workdir / "keycloak.log"
        self.startup_seconds: float | None = None
        self._realm_jwks: dict[str, dict[str, Any]] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0

    def realm_issuer(self, realm: str) -> str:
        return f"{self.base_url}/realms/{realm}"

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.bundle.start()
        run_home = self._run_home()
        cert, key = self.ca.issue_server("localhost", "127.0.0.1").write(self.workdir, "kc-tls")
        java_home = (home() / ".java-home").read_text().strip()
        env = {
            **os.environ,
            "JAVA_HOME": java_home,
            # realm.json names the bundle endpoints through these (Keycloak's ${VAR} import).
            "SIDECAR_KEYCLOAK_BUNDLE_URL": f"{self.bundle.url}/bundle",
            "SIDECAR_KEYCLOAK_OIDC_ISSUER": f"{self.bundle.url}/oidc",
        }
        args = [
            str(run_home / "bin" / "kc.sh"),
            "start",
            "--optimized",
            "--http-enabled=false",
            "--http-host=127.0.0.1",
            f"--https-port={self.port}",
            f"--https-certificate-file={cert}",
            f"--https-certificate-key-file={key}",
            f"--hostname={self.base_url}",
            f"--truststore-paths={self.ca_file}",
            "--cache=local",  # no cluster: Infinispan would otherwise open JGroups ports
            "--import-realm",
            # A new kid is looked up at once (rotation, a new trust domain per test), instead of
            # waiting out the default 10 s between key fetches.
            "--spi-public-key-storage--infinispan--min-time-between-requests=-1",
            "--log-level=" + os.environ.get("SIDECAR_KEYCLOAK_LOG_LEVEL", "warn"),
        ]
        self._started_at = time.monotonic()
        with self.log_file.open("wb") as log:
            self._process = subprocess.Popen(  # noqa: S603 - the cached kc.sh, our arguments
                args,
                cwd=run_home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one below
            )

    def _run_home(self) -> Path:
        """A private Keycloak home for this run: its own bin/ and data/ (import dir, H2 temp
        files), the cached build's lib/, themes/, providers/ and conf/ shared read-only (a
        `start --optimized` writes nothing there)."""
        built = home()
        run_home = self.workdir / "keycloak-home"
        shutil.copytree(built / "bin", run_home / "bin")
        for name in ("lib", "themes", "providers", "conf"):
            (run_home / name).symlink_to(built / name)
        (run_home / "data" / "import").mkdir(parents=True)
        for realm_file in REALM_FILES:
            shutil.copy(realm_file, run_home / "data" / "import" / realm_file.name)
        return run_home

    def wait_ready(self) -> None:
        if self.startup_seconds is not None:
            return
        assert self._process is not None, "Keycloak was not started"
        context = self.ca.client_context()
        deadline = self._started_at + START_TIMEOUT
        url = f"{self.issuer}/.well-known/openid-configuration"
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"Keycloak exited ({self._process.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, context=context, timeout=5) as answer:  # noqa: S310
                    metadata = json.load(answer)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Keycloak not ready in {START_TIMEOUT} s:\n{self.tail()}"
                    ) from exc
                # Not a synchronisation sleep: a bounded poll of a process we cannot await.
                time.sleep(0.25)
        self.startup_seconds = time.monotonic() - self._started_at
        assert metadata["issuer"] == self.issuer
        for realm in (REALM, FEDERATION_REALM):
            keys = f"{self.realm_issuer(realm)}/protocol/openid-connect/certs"
            with urllib.request.urlopen(keys, context=context, timeout=5) as answer:  # noqa: S310
                self._realm_jwks[realm] = json.load(answer)

    @property
    def jwks(self) -> dict[str, Any]:
        """The signing keys of the SPIFFE realm (what the protected API trusts)."""
        return self._realm_jwks[REALM]

    def realm_jwks(self, issuer: str) -> dict[str, Any]:
        return self._realm_jwks[issuer.rpartition("/")[2]]

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self.bundle.stop()

    def ssl_context(self) -> ssl.SSLContext:
        return self.ca.client_context()
