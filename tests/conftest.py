"""Shared fixtures: the real dev stack on loopback and the real sidecar in front of it.

Every log record of every test is formatted with the production formatter and kept; when a
test that used the dev stack ends, none of the credentials the stack issued (JWT-SVIDs, access
tokens) may appear in any of it, at any level.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop

from sidecar import config
from sidecar.credentials.dpop import b64url
from sidecar.devstack.stack import DevStack, dev_stack
from sidecar.ops.logs import JsonFormatter, RedactingFilter
from sidecar.runtime import Sidecar


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The suite runs on uvloop, the loop `sidecar run` uses in production."""
    return {"uvloop": uvloop.new_event_loop}


class LogCapture(logging.Handler):
    """Every record, formatted twice: as production writes it (with the redacting filter) and
    raw. Secrets are looked for in the raw text: the filter is a second line of defence, the
    first is that no code passes a credential to a logger at all."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.raw: list[str] = []
        self.records: list[logging.LogRecord] = []
        self.setFormatter(JsonFormatter())
        self._redact = RedactingFilter()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.raw.append(self.format(record))
        if record.exc_info:
            self.raw.append(logging.Formatter().formatException(record.exc_info))
        redacted = logging.makeLogRecord(record.__dict__)
        self._redact.filter(redacted)
        self.lines.append(self.format(redacted))

    def text(self) -> str:
        """Everything logged, raw and as written out."""
        return "\n".join([*self.raw, *self.lines])


@pytest.fixture(autouse=True)
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(previous)


def assert_no_secrets(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        for part in (secret, *secret.split(".")[1:]):  # the whole JWT, its payload, its signature
            if len(part) > 16:
                assert part not in text, "a credential reached the logs"


@pytest.fixture
async def stack(tmp_path: Path, logs: LogCapture) -> AsyncIterator[DevStack]:
    async with dev_stack(tmp_path) as running:
        yield running
        assert_no_secrets(logs.text(), running.secrets())


@contextlib.asynccontextmanager
async def running_sidecar(
    stack: DevStack, *, clock: Callable[[], float] | None = None, **overrides: Any
) -> AsyncIterator[Sidecar]:
    cfg = config.parse(stack.sidecar_config(**overrides))
    async with Sidecar(cfg, grace=5.0, clock=clock or time.monotonic) as sidecar:
        yield sidecar
    # The DPoP private key never reaches a log either.
    d = sidecar.dpop_key._key.private_numbers().private_value
    private = b64url(d.to_bytes(32, "big"))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogCapture):
            assert private not in handler.text(), "the DPoP private key reached the logs"


class ManualClock:
    """A monotonic clock the test moves: token lifetimes without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def sidecar(stack: DevStack) -> AsyncIterator[Sidecar]:
    async with running_sidecar(stack) as running:
        yield running


@pytest.fixture
async def app(sidecar: Sidecar) -> AsyncIterator[AppClient]:
    async with AppClient(sidecar) as client:
        yield client


class AppClient:
    """Behaves like the legacy app: plain http:// URLs through HTTP_PROXY."""

    def __init__(self, sidecar: Sidecar) -> None:
        assert sidecar.proxy_address is not None
        self.proxy = f"http://{sidecar.proxy_address}"
        self.address = sidecar.proxy_address
        self.session = aiohttp.ClientSession()

    async def __aenter__(self) -> AppClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def request(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any, bytes]:
        async with self.session.request(method, url, proxy=self.proxy, **kwargs) as resp:
            return resp.status, resp.headers, await resp.read()

    async def raw(self, data: bytes) -> bytes:
        """Send raw bytes on a fresh connection; return everything the sidecar answers."""
        reader, writer = await asyncio.open_connection(self.address.host, self.address.port)
        try:
            writer.write(data)
            await writer.drain()
            return await asyncio.wait_for(reader.read(65536), 10)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
