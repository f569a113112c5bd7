"""Run a real SPIRE (server + agent, built by `make spire`) in a private directory.

The server listens on 127.0.0.1 (agent API) and a unix socket (its admin API); the agent
attests with a one-time join token and serves the Workload API on a unix socket; workloads are
attested by the unix workload attestor, here the test process's uid. SQLite datastore and
in-memory keys: nothing outside the directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from sidecar.credentials.identity import WorkloadIdentity
from tests.interop.cache import missing

TRUST_DOMAIN = "example.org"
AGENT_ID = f"spiffe://{TRUST_DOMAIN}/agent/interop"
START_TIMEOUT = 60.0


def binaries() -> Path:
    """The directory `make spire` built into (the Makefile passes it as $SIDECAR_SPIRE_BIN)."""
    explicit = os.environ.get("SIDECAR_SPIRE_BIN")
    if not explicit:
        # Not a failure under CI either: .ci/run runs these in their own target.
        pytest.skip("SPIRE runs in its own target: `make interop-spire` (.ci/run runs it)")
    path = Path(explicit)
    if not (path / "spire-server").is_file() or not (path / "spire-agent").is_file():
        missing(f"SPIRE is not built in {path}: run `make spire`")
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Spire:
    def __init__(self, bin_dir: Path, workdir: Path) -> None:
        self.bin = bin_dir
        self.dir = workdir
        self.server_socket = workdir / "server.sock"
        self.agent_socket = workdir / "agent.sock"
        self.port = _free_port()
        self._server: asyncio.subprocess.Process | None = None
        self._agent: asyncio.subprocess.Process | None = None
        self.agent_starts = 0

    @property
    def workload_api(self) -> str:
        return f"unix://{self.agent_socket}"

    # -- configuration ----------------------------------------------------------------------
    def _write_configs(self) -> None:
        (self.dir / "server.conf").write_text(
            f"""
server {{
  bind_address = "127.0.0.1"
  bind_port = "{self.port}"
  socket_path = "{self.server_socket}"
  trust_domain = "{TRUST_DOMAIN}"
  data_dir = "{self.dir}/server-data"
  log_level = "WARN"
  ca_ttl = "2h"
  default_x509_svid_ttl = "1h"
  default_jwt_svid_ttl = "5m"
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{self.dir}/server-data/datastore.sqlite3"
    }}
  }}
  NodeAttestor "join_token" {{ plugin_data {{}} }}
  KeyManager "memory" {{ plugin_data {{}} }}
}}
"""
        )
        (self.dir / "agent.conf").write_text(
            f"""
agent {{
  data_dir = "{self.dir}/agent-data"
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "{self.port}"
  socket_path = "{self.agent_socket}"
  trust_bundle_path = "{self.dir}/bundle.pem"
  trust_domain = "{TRUST_DOMAIN}"
}}
plugins {{
  NodeAttestor "join_token" {{ plugin_data {{}} }}
  KeyManager "disk" {{ plugin_data {{ directory = "{self.dir}/agent-data" }} }}
  WorkloadAttestor "unix" {{ plugin_data {{}} }}
}}
"""
        )

    # -- commands -----------------------------------------------------------------------------
    async def _cli(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            str(self.bin / "spire-server"),
            *args,
            "-socketPath",
            str(self.server_socket),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        if process.returncode != 0:
            raise RuntimeError(f"spire-server {args[0]} failed: {out.decode(errors='replace')}")
        return out.decode()

    async def _until_healthy(self, binary: str, sock: Path, process: Any) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.05
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"{binary} exited ({process.returncode}): {self.log(binary)}")
            check = await asyncio.create_subprocess_exec(
                str(self.bin / binary),
                "healthcheck",
                "-socketPath",
                str(sock),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await check.wait() == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{binary} not healthy in {START_TIMEOUT} s: {self.log(binary)}")
            # A bounded readiness poll of another program (it offers no event to wait on).
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def log(self, binary: str) -> str:
        with suppress(OSError):
            return (self.dir / f"{binary}.log").read_text(errors="replace")[-4000:]
        return ""

    async def _run(self, binary: str, *args: str) -> asyncio.subprocess.Process:
        log = (self.dir / f"{binary}.log").open("ab")
        try:
            return await asyncio.create_subprocess_exec(
                str(self.bin / binary),
                "run",
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._write_configs()
        self._server = await self._run("spire-server", "-config", str(self.dir / "server.conf"))
        await self._until_healthy("spire-server", self.server_socket, self._server)
        (self.dir / "bundle.pem").write_text(await self._cli("bundle", "show"))
        token = await self._cli("token", "generate", "-spiffeID", AGENT_ID, "-ttl", "600")
        self._join_token = token.split()[-1]
        await self.start_agent()

    async def start_agent(self) -> None:
        args = ["-config", str(self.dir / "agent.conf")]
        if self.agent_starts == 0:  # later starts re-attest with the SVID in agent-data
            args += ["-joinToken", self._join_token]
        self._agent = await self._run("spire-agent", *args)
        self.agent_starts += 1
        await self._until_healthy("spire-agent", self.agent_socket, self._agent)

    async def stop_agent(self) -> None:
        await self._stop(self._agent)
        self._agent = None

    async def register(
        self, spiffe_id: str, *, x509_ttl: int | None = None, jwt_ttl: int | None = None
    ) -> None:
        """Register a workload: this test process, by uid (the unix workload attestor)."""
        args = ["entry", "create", "-parentID", AGENT_ID, "-spiffeID", spiffe_id]
        args += ["-selector", f"unix:uid:{os.getuid()}"]
        if x509_ttl is not None:
            args += ["-x509SVIDTTL", str(x509_ttl)]
        if jwt_ttl is not None:
            args += ["-jwtSVIDTTL", str(jwt_ttl)]
        await self._cli(*args)

    async def jwt_svid(self, audience: str) -> str:
        """The JWT-SVID the agent serves for ``audience`` (it caches one per audience: the same
        one the sidecar presented)."""
        identity = WorkloadIdentity(self.workload_api, timeout=5.0)
        try:
            return (await identity.jwt_svid(audience)).token.reveal()
        finally:
            await identity.close()

    async def until_issued(self, audience: str) -> None:
        """Wait (bounded) until the agent has synced its entries and serves this workload: the
        product's own readiness wait, with its backoff."""
        identity = WorkloadIdentity(self.workload_api, timeout=5.0)
        try:
            await asyncio.wait_for(
                identity.wait_until_ready(audience, x509=True, max_delay=1.0), START_TIMEOUT
            )
        finally:
            await identity.close()

    async def jwt_bundle(self) -> dict[str, Any]:
        """The trust domain's JWT authorities as a JWKS (from the server's SPIFFE bundle)."""
        bundle = json.loads(await self._cli("bundle", "show", "-format", "spiffe"))
        return {"keys": [k for k in bundle["keys"] if k.get("use") == "jwt-svid"]}

    async def x509_bundle_pem(self) -> str:
        return await self._cli("bundle", "show")

    async def stop(self) -> None:
        await self._stop(self._agent)
        await self._stop(self._server)

    @staticmethod
    async def _stop(process: asyncio.subprocess.Process | None) -> None:
        if process is None or process.returncode is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


@asynccontextmanager
async def spire() -> AsyncIterator[Spire]:
    bin_dir = binaries()
    # Unix socket paths are limited to ~107 bytes: a short private directory.
    workdir = Path(tempfile.mkdtemp(prefix="spire-"))
    running = Spire(bin_dir, workdir)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()
        shutil.rmtree(workdir, ignore_errors=True)
