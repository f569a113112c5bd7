"""The chaos environment: the dev stack with a fault proxy in front of each peer, and the real
sidecar (``sidecar run``) as a subprocess configured to reach the peers only through them.

    app (LoadGenerator) -> sidecar -> FaultProxy -> SaaS API
                                   -> FaultProxy -> authorization server
                                   -> FaultProxy (unix) -> Workload API

The peers advertise the proxies' addresses (``public_issuer``, ``public_base_url``), so DPoP
``htu`` values and JWT-SVID audiences are checked against what the sidecar really dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.run import _free_port, peak_rss_mb, process_tree
from chaos.faults import FaultProxy
from sidecar.devstack.stack import DevStack, dev_stack

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Environment:
    stack: DevStack
    work: Path
    auth: FaultProxy
    upstream: FaultProxy
    workload: FaultProxy

    def config(self, **overrides: Any) -> dict[str, Any]:
        """A sidecar config whose every peer is behind its fault proxy."""
        server = {"issuer": self.stack.auth_server.issuer, "timeout": 2.0}
        server.update(overrides.pop("authorization_server", {}))
        destination: dict[str, Any] = {
            "upstream": self.stack.saas.base_url,
            "connect_timeout": 1.0,
            "read_timeout": 2.0,
            "total_timeout": 4.0,
            "max_connections": 16,
        }
        destination.update(overrides.pop("destination", {}))
        doc = self.stack.sidecar_config(
            authorization_server=server,
            destination=destination,
            spiffe={"socket": self.workload.address},
            listen=f"127.0.0.1:{_free_port()}",
            admin=f"127.0.0.1:{_free_port()}",
            log={"level": "warning"},
            tokens={"prefetch": True},  # ready means a token is held: load starts warm
        )
        doc.update(overrides)
        return doc


@contextlib.asynccontextmanager
async def environment(
    work: Path,
    *,
    token_ttl: int = 300,
    x509_ttl: float = 3600.0,
    jwt_ttl: float = 300.0,
) -> AsyncIterator[Environment]:
    work.mkdir(parents=True, exist_ok=True)
    async with dev_stack(
        work,
        auth_server={"token_ttl": token_ttl},
        workload_api={"x509_ttl": x509_ttl, "jwt_ttl": jwt_ttl},
    ) as stack:
        real_socket = stack.workload_api.socket_path
        proxied_socket = real_socket.with_name("chaos.sock")
        async with (
            FaultProxy(("127.0.0.1", stack.auth_server.port)) as auth,
            FaultProxy(("127.0.0.1", stack.saas.port)) as upstream,
            FaultProxy(real_socket, listen_path=proxied_socket) as workload,
        ):
            stack.auth_server.public_issuer = f"https://{auth.address}"
            stack.saas.issuer = stack.auth_server.public_issuer  # tokens carry the public iss
            stack.saas.public_base_url = f"https://{upstream.address}"
            yield Environment(stack, work, auth, upstream, workload)


class ConfigMap:
    """The kubelet's layout: ``sidecar.yaml -> ..data/sidecar.yaml``, ``..data -> ..vN``,
    swapped by renaming a new ``..data`` symlink over the old one (atomic)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "sidecar.yaml"

    def publish(self, doc: dict[str, Any]) -> None:
        self.version += 1
        target = self.root / f"..v{self.version}"
        target.mkdir()
        (target / "sidecar.yaml").write_text(yaml.safe_dump(doc))
        link = self.root / "..data_tmp"
        link.symlink_to(target.name)
        os.replace(link, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/sidecar.yaml")


# -- the sidecar process ---------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return 0


def connections_to(pid: int, port: int) -> int:
    """Open fds of ``pid`` that are TCP connections to ``port``: its socket inodes matched
    against the namespace's /proc/PID/net/tcp and tcp6 (remote port, hex, field 3)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            next(f, None)  # the header
            for line in f:
                fields = line.split()
                if len(fields) > 9 and int(fields[2].rpartition(":")[2], 16) == port:
                    inodes.add(fields[9])
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                count += target.startswith("socket:[") and target[8:-1] in inodes
    return count


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class SidecarProcess:
    """``python -m sidecar run`` with a generated config; optional --workers and fd limit."""

    def __init__(
        self,
        env: Environment,
        doc: Mapping[str, Any],
        *,
        name: str,
        workers: int = 1,
        nofile: int | None = None,
        grace: float = 10.0,
        config_path: Path | None = None,  # given: a ConfigMap-style tree the caller manages
    ) -> None:
        self.doc = dict(doc)
        self.name = name
        self.workers = workers
        self.nofile = nofile
        self.grace = grace
        self.config_path = config_path or env.work / f"{name}.yaml"
        self.log_path = env.work / f"{name}.log"
        self.admin = str(self.doc["admin"])
        host, _, port = str(self.doc["listen"]).rpartition(":")
        self.listen = (host, int(port))
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pids(self) -> list[int]:
        return process_tree(self.pid)

    def workers_pids(self) -> list[int]:
        return [p for p in self.pids() if p != self.pid]

    def fds(self) -> int:
        return sum(fd_count(p) for p in self.pids())

    def connections_to(self, port: int) -> int:
        return sum(connections_to(p, port) for p in self.pids())

    def rss_mb(self) -> float:
        return max((rss_mb(p) for p in self.pids()), default=0.0)

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.pids())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _limited(self, command: list[str]) -> list[str]:
        """``command`` with the scenario's RLIMIT_NOFILE, set by a shell that then execs it
        (same pid): no Python runs between fork and exec in this process, which hosts the dev
        stack's gRPC threads (a ``preexec_fn`` forces fork() and runs Python in the child)."""
        if self.nofile is None:
            return command
        return ["/bin/sh", "-c", 'ulimit -n "$0" && exec "$@"', str(self.nofile), *command]

    async def __aenter__(self) -> SidecarProcess:
        if not self.config_path.is_symlink():
            self.config_path.write_text(yaml.safe_dump(self.doc))
        command = [
            sys.executable, "-m", "sidecar", "run", "--config", str(self.config_path),
            "--grace", str(self.grace), "--workers", str(self.workers),
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self._limited(command), stderr=log, cwd=ROOT)
        try:
            await self.wait_ready(30.0)
        except BaseException:
            await self.kill()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    async def kill(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, self.grace + 10)
        except subprocess.TimeoutExpired:
            for pid in reversed(self.pids()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(self.process.wait, 10)

    async def wait_exit(self, timeout: float) -> int | None:
        assert self.process is not None
        try:
            return await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            return None

    async def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET on the admin port; (0, reason) when it does not answer within ``timeout``."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.get(f"http://{self.admin}{path}") as resp,
            ):
                return resp.status, await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return 0, type(exc).__name__

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                break
            status, _ = await self.get("/readyz", timeout=1.0)
            if status == 200:
                return
            await asyncio.sleep(0.05)
        tail = self.log_text()[-2000:]
        raise RuntimeError(f"sidecar {self.name} did not become ready:\n{tail}")

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples matching ``labels`` (0 when absent)."""
        status, text = await self.get("/metrics")
        if status != 200:
            return 0.0
        return metric_value(text, name, labels)


def metric_value(text: str, name: str, labels: Mapping[str, str]) -> float:
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] != name:
            continue
        if all(w in series for w in wanted):
            with contextlib.suppress(ValueError):
                total += float(value)
    return total
