"""A bounded load generator: the legacy app, at a fixed rate, through the sidecar's proxy port.

Open loop (a request leaves every ``1/rate`` seconds whether or not earlier ones were answered,
as an app's callers do), bounded in count AND time: at most ``rate * duration`` requests, each
given up after ``timeout`` seconds. Raw HTTP/1.1 over keep-alive connections, parsed just enough
to classify the answer; every request ends as exactly one :class:`Answer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.devstack.stack import SAAS_HOST

_HEAD_LIMIT = 65536
_BODY_LIMIT = 1 << 20

# Kinds of answer that are not HTTP answers.
REFUSED = "refused"  # the connection could not be opened: the request was never sent
CLOSED = "closed"  # the connection ended before an answer: the request is lost
TIMEOUT = "timeout"  # no answer within the client's limit: the request is lost
SHED = "shed"  # the generator itself was at its concurrency cap: never sent
LOST = frozenset({CLOSED, TIMEOUT})


@dataclass(slots=True)
class Answer:
    sent: float  # monotonic seconds
    done: float
    status: int  # 0: no HTTP answer
    kind: str  # "200", "503 token_unavailable", or one of REFUSED / CLOSED / TIMEOUT / SHED
    retry_after: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200


class _Protocol(Exception):
    """The sidecar's answer was not parseable HTTP/1.1 (counted as closed)."""


class LoadGenerator:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        rate: float,
        timeout: float = 15.0,
        concurrency: int = 1000,
        path: str = "/v1/invoices",
    ) -> None:
        self.address = (host, port)
        self.rate = rate
        self.timeout = timeout
        self.concurrency = concurrency
        self.request = (
            f"GET http://{SAAS_HOST}{path} HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"
            "Accept: application/json\r\n\r\n"
        ).encode()
        self.answers: list[Answer] = []
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """End the run early (the sidecar is going away on purpose)."""
        self._stop.set()

    async def run(self, duration: float) -> list[Answer]:
        """Send for ``duration`` seconds; return once every request has its answer."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        count = int(duration * self.rate)
        for index in range(count):
            delay = start + index / self.rate - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                break
            if len(self._in_flight) >= self.concurrency:
                now = time.monotonic()
                self.answers.append(Answer(now, now, 0, SHED))
                continue
            task = asyncio.ensure_future(self._one())
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
        return self.answers

    async def _one(self) -> None:
        sent = time.monotonic()
        answer = Answer(sent, sent, 0, TIMEOUT)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self._exchange(sent)
        except TimeoutError:
            answer = Answer(sent, time.monotonic(), 0, TIMEOUT)
        self.answers.append(answer)

    async def _exchange(self, sent: float) -> Answer:
        reused = bool(self._idle)
        if reused:
            reader, writer = self._idle.pop()
        else:
            try:
                reader, writer = await asyncio.open_connection(*self.address)
            except OSError:
                return Answer(sent, time.monotonic(), 0, REFUSED)
        keep = False
        try:
            writer.write(self.request)
            await writer.drain()
            status, headers, body = await _read_response(reader)
            keep = headers.get("connection", "").lower() != "close"
            return Answer(
                sent, time.monotonic(), status, _kind(status, body), "retry-after" in headers
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _Protocol):
            return Answer(sent, time.monotonic(), 0, CLOSED)
        finally:
            if keep:
                self._idle.append((reader, writer))
            else:
                writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > _HEAD_LIMIT:
        raise _Protocol
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _Protocol
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        length = int(headers.get("content-length", "0") or 0)
        if length > _BODY_LIMIT:
            raise _Protocol
        body = await reader.readexactly(length)
    return int(parts[1]), headers, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(body)
        if len(body) + size > _BODY_LIMIT:
            raise _Protocol
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def _kind(status: int, body: bytes) -> str:
    """``200``, or the status and the sidecar's JSON ``error`` code (``503 token_unavailable``)."""
    if status < 400:
        return str(status)
    try:
        code = json.loads(body).get("error")
    except (ValueError, AttributeError):
        code = None
    return f"{status} {code}" if isinstance(code, str) else str(status)


# -- what a run says (pure) ----------------------------------------------------------------------


def kinds(answers: Iterable[Answer]) -> Counter[str]:
    return Counter(a.kind for a in answers)


def between(answers: Iterable[Answer], start: float, end: float) -> list[Answer]:
    """The requests sent in [start, end)."""
    return [a for a in answers if start <= a.sent < end]


@dataclass(frozen=True)
class Recovery:
    first_ok: float | None  # seconds from the fault's end to the first success sent after it
    all_ok: float | None  # seconds from the fault's end to the send time after which all succeed


def recovery(answers: Iterable[Answer], fault_end: float) -> Recovery:
    after = sorted((a for a in answers if a.kind != SHED), key=lambda a: a.sent)
    first = next((a for a in after if a.sent >= fault_end and a.ok), None)
    last_bad = max((a.sent for a in after if not a.ok), default=None)
    later = [a for a in after if a.sent >= fault_end and (last_bad is None or a.sent > last_bad)]
    all_ok = max(0.0, later[0].sent - fault_end) if later else None
    return Recovery(max(0.0, first.done - fault_end) if first else None, all_ok)
