"""``sidecar run --workers N``: start N worker processes on the same proxy ports
(SO_REUSEPORT), own the pod's one admin port in front of them (:mod:`sidecar.ops.pod_admin`),
forward signals, and exit when they do.

The first worker to exit ends the group: a crashed worker must not leave a partial sidecar
behind (the kubelet restarts the container instead). The exit code is the worst of the
workers': a worker killed by a signal counts as 128 + the signal number, as shells report it
(SIGKILL: 137), and is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from sidecar.config import ENV_ADMIN, Address
from sidecar.ops.pod_admin import PodAdmin

log = logging.getLogger("sidecar")

WORKER_ADMIN = "127.0.0.1:0"  # each worker's own admin endpoint: loopback, a free port


def exit_code(returncode: int) -> int:
    """A process's exit status as a shell reports it: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def parse_address(text: str) -> Address | None:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        return None
    return Address(host.strip("[]"), int(port))


async def _track(pod_admin: PodAdmin, name: str, reader: asyncio.StreamReader) -> None:
    """The worker writes its admin address on its report pipe once it serves."""
    with contextlib.suppress(OSError, ValueError):
        line = await reader.readline()
        pod_admin.workers[name] = parse_address(line.decode("ascii"))


async def supervise(worker_command: Sequence[str], workers: int, admin: Address | None) -> int:
    names = [str(n) for n in range(workers)]
    pod_admin = PodAdmin(dict.fromkeys(names))
    if admin is not None:
        try:  # before any worker starts: a port in use is a clean exit 1, nothing to stop
            bound = await pod_admin.start(admin)
        except OSError as exc:
            log.error(
                "cannot start: is another process using the admin port?",
                extra={"admin": str(admin), "error": str(exc)},
            )
            return 1
        log.info("pod admin listening", extra={"admin": str(bound), "workers": workers})
    try:
        procs, reports = await _start_workers(worker_command, names, pod_admin)
        try:
            await _run(procs)
        finally:
            for report in reports:
                report.cancel()
            await asyncio.gather(*reports, return_exceptions=True)
    finally:
        await pod_admin.stop()
    return max(_outcome(name, proc) for name, proc in zip(names, procs, strict=True))


async def _start_workers(
    command: Sequence[str], names: list[str], pod_admin: PodAdmin
) -> tuple[list[asyncio.subprocess.Process], list[asyncio.Task[None]]]:
    """Each worker with its admin endpoint on loopback port 0, reported on a pipe."""
    loop = asyncio.get_running_loop()
    env = {**os.environ, ENV_ADMIN: WORKER_ADMIN}
    procs: list[asyncio.subprocess.Process] = []
    reports: list[asyncio.Task[None]] = []
    for name in names:
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, "--report-fd", str(write_fd), pass_fds=(write_fd,), env=env
            )
        finally:
            os.close(write_fd)
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        await loop.connect_read_pipe(lambda p=protocol: p, os.fdopen(read_fd, "rb"))  # type: ignore[misc]
        procs.append(proc)
        reports.append(asyncio.ensure_future(_track(pod_admin, name, reader)))
    log.info("workers started", extra={"workers": len(procs), "pids": [p.pid for p in procs]})
    return procs, reports


async def _run(procs: list[asyncio.subprocess.Process]) -> None:
    """Forward signals; when the first worker exits, stop the others and wait for them."""
    loop = asyncio.get_running_loop()
    stopping: set[int] = set()  # workers sent SIGTERM/SIGINT: a second one could kill them

    def forward(signum: int) -> None:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signum)
                if signum != signal.SIGHUP:
                    stopping.add(proc.pid)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, forward, sig)
    try:
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for proc in procs:
            if proc.returncode is None and proc.pid not in stopping:
                proc.send_signal(signal.SIGTERM)
                stopping.add(proc.pid)
        await asyncio.gather(*waits)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _outcome(name: str, proc: asyncio.subprocess.Process) -> int:
    """The worker's exit code as a shell reports it, logged unless it is 0."""
    assert proc.returncode is not None
    code = exit_code(proc.returncode)
    if proc.returncode < 0:
        log.error(
            "worker died by a signal",
            extra={
                "worker": name,
                "pid": proc.pid,
                "signal": signal.Signals(-proc.returncode).name,
                "exit_code": code,
            },
        )
    elif code != 0:
        log.error("worker exited", extra={"worker": name, "pid": proc.pid, "exit_code": code})
    return code


def worker_command(config_path: str | None, grace: float) -> list[str]:
    command = [sys.executable, "-m", "sidecar", "run", "--worker", "--grace", str(grace)]
    if config_path:
        command += ["--config", config_path]
    return command
