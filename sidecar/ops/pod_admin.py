"""The pod's one admin port when ``sidecar run --workers N`` runs several processes.

Each worker serves its own admin endpoints on a private loopback port (port 0, reported to the
supervisor); the supervisor owns the pod's admin port and answers from all of them:

- ``/metrics``: every worker's exposition merged (:func:`merge_expositions`). Counters,
  histograms and summaries are summed across workers (the pod's totals); gauges get a
  ``worker`` label instead, because a sum is wrong for most of them (seconds until a token
  expires, an SVID's expiry).
- ``/readyz``: ready only when every worker is (:func:`combine_readiness`); the body names
  each worker's problems. A worker that does not answer is not ready.
- ``/healthz``: alive only when every worker answers its own (a worker whose event loop is
  stuck fails the pod's liveness probe, as it would alone).

The merging is pure; the I/O (a minimal HTTP/1.1 GET client and server on asyncio streams,
no aiohttp: ``sidecar run`` does not depend on it) is kept small so it can move onto the
project's own listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sidecar.config import Address
from sidecar.ops.metrics import CONTENT_TYPE

log = logging.getLogger("sidecar.admin")

SUMMED = frozenset({"counter", "histogram", "summary"})
FETCH_TIMEOUT = 5.0  # seconds for one worker's answer (below the usual scrape timeout)
MAX_ANSWER = 16 * 1024 * 1024  # bytes read from one worker's answer
MAX_HEAD = 8 * 1024  # bytes of a request head on the pod's admin port


@dataclass(frozen=True)
class WorkerAnswer:
    """What one worker's admin endpoint answered: its HTTP status and body (None: nothing,
    it did not answer in time or is not listening yet)."""

    worker: str
    status: int | None
    body: bytes = b""


# -- pure ---------------------------------------------------------------------------------------


def merge_expositions(expositions: Iterable[tuple[str, str]]) -> bytes:
    """One Prometheus text exposition from ``(worker, text)`` pairs: samples of summed types
    added up by name and labels, gauges (and untyped) kept per worker with a ``worker`` label."""
    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker, text in expositions:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type
                )
                sums[family.name] = {}
            if family.type in SUMMED:
                totals = sums[family.name]
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    totals[key] = totals.get(key, 0.0) + sample.value
            else:
                for sample in family.samples:
                    merged.add_sample(
                        sample.name, {**sample.labels, "worker": worker}, sample.value
                    )
    for name, totals in sums.items():
        for (sample_name, labels), value in totals.items():
            families[name].add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def combine_readiness(
    answers: Sequence[WorkerAnswer], *, detail: bool = True
) -> tuple[int, dict[str, object]]:
    """200 when every worker's ``/readyz`` said 200, else 503; the problems of each worker
    (its own words, prefixed with the worker; without ``detail`` only which things are not
    ready, for a port reachable beyond loopback) and a state per worker."""
    problems: dict[str, object] = {}
    workers: dict[str, str] = {}
    for answer in answers:
        if answer.status is None:
            workers[answer.worker] = "not answering"
            problems[f"worker {answer.worker}"] = "its admin endpoint did not answer"
            continue
        workers[answer.worker] = "ready" if answer.status == 200 else "not ready"
        if answer.status != 200:
            own = _json_object(answer.body).get("problems")
            if isinstance(own, dict) and own:
                for what, why in own.items():
                    problems[f"worker {answer.worker}: {what}"] = why if detail else "not ready"
            else:
                problems[f"worker {answer.worker}"] = f"answered {answer.status}"
    ready = bool(answers) and not problems
    return (200 if ready else 503), {"ready": ready, "workers": workers, "problems": problems}


def combine_health(answers: Sequence[WorkerAnswer]) -> tuple[int, dict[str, object]]:
    workers = {a.worker: "ok" if a.status == 200 else "not answering" for a in answers}
    healthy = bool(answers) and all(a.status == 200 for a in answers)
    return (200 if healthy else 503), {
        "status": "ok" if healthy else "unhealthy",
        "workers": workers,
    }


def _json_object(body: bytes) -> dict[str, object]:
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


# -- I/O ----------------------------------------------------------------------------------------


async def fetch(worker: str, address: Address | None, path: str) -> WorkerAnswer:
    """GET ``path`` from a worker's loopback admin endpoint; status None if it fails."""
    if address is None:
        return WorkerAnswer(worker, None)
    try:
        async with asyncio.timeout(FETCH_TIMEOUT):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
                answer = b""
                while chunk := await reader.read(65536):
                    answer += chunk
                    if len(answer) > MAX_ANSWER:
                        return WorkerAnswer(worker, None)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return WorkerAnswer(worker, None)
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        return WorkerAnswer(worker, None)
    return WorkerAnswer(worker, int(status_line[1]), body)


class PodAdmin:
    """The supervisor's admin server: fans each request out to the workers' endpoints."""

    def __init__(self, workers: dict[str, Address | None]) -> None:
        self.workers = workers  # worker -> its admin address, once it reported it
        self._server: asyncio.Server | None = None
        self._detail = True  # problems in the workers' words: only on a loopback port

    async def start(self, address: Address) -> Address:
        self._detail = address.is_loopback

        self._server = await asyncio.start_server(
            self._serve, address.host, address.port, limit=MAX_HEAD
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        return Address(host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _gather(self, path: str) -> list[WorkerAnswer]:
        return list(
            await asyncio.gather(*(fetch(w, a, path) for w, a in sorted(self.workers.items())))
        )

    async def answer(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``."""
        if path == "/metrics":
            answers = await self._gather("/metrics")
            texts = [
                (a.worker, a.body.decode("utf-8", "replace")) for a in answers if a.status == 200
            ]
            return 200, CONTENT_TYPE, merge_expositions(texts)
        if path == "/readyz":
            status, doc = combine_readiness(await self._gather(path), detail=self._detail)
            return status, "application/json", json.dumps(doc).encode()
        if path == "/healthz":
            status, doc = combine_health(await self._gather(path))
            return status, "application/json", json.dumps(doc).encode()
        return 404, "application/json", b'{"error": "not_found"}'

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(30):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
                status, kind, body = 405, "application/json", b'{"error": "method_not_allowed"}'
            else:
                path = parts[1].decode("latin-1").split("?", 1)[0]
                status, kind, body = await self.answer(path)
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(
                status, "Service Unavailable"
            )
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if parts[0] != b"HEAD" else b"")
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a probe that went away or sent garbage: nothing to answer
        finally:
            writer.close()
