"""One Keycloak per test run, started as soon as collection shows a Keycloak test so its JVM
warms up while the rest of the suite runs; a test waits for it only when it needs it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.interop.cache import missing
from tests.interop.keycloak import server

_HERE = Path(__file__).parent
_running: server.Keycloak | None = None
_startup: list[float] = []  # seconds from start to ready, for the summary line


def _start() -> server.Keycloak:
    global _running
    if _running is None:
        workdir = Path(tempfile.mkdtemp(prefix="sidecar-keycloak-"))
        _running = server.Keycloak(workdir)
        _running.start()
    return _running


def pytest_collection_finish(session: pytest.Session) -> None:
    wanted = any(_HERE in Path(item.path).parents for item in session.items)
    if wanted and server.installed():
        _start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    global _running
    if _running is not None:
        if _running.startup_seconds is not None:
            _startup.append(_running.startup_seconds)
        _running.stop()
        if not os.environ.get("SIDECAR_KEYCLOAK_KEEP"):
            shutil.rmtree(_running.workdir, ignore_errors=True)
        _running = None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for seconds in _startup:
        terminalreporter.write_line(
            f"keycloak {server.VERSION}: ready {seconds:.1f} s after its start"
        )


@pytest.fixture(scope="session")
def keycloak() -> server.Keycloak:
    if not server.installed():
        missing(f"Keycloak {server.VERSION} is not installed: run `make keycloak` (make test does)")
    running = _start()
    running.wait_ready()
    return running  # stopped in pytest_sessionfinish (it may start before any fixture)
