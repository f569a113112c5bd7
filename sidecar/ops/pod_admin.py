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

The merging is pure. The pod's port is the same admin server a single process runs
(:class:`~sidecar.ops.admin.Admin` on the project's listener: bounded heads, connections and
timeouts, GET only, 400 for malformed requests; readiness texts only for loopback peers); only
the answers differ. The workers are asked with a minimal HTTP/1.0 GET on asyncio streams, to
their loopback ports, answers bounded.
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
from sidecar.ops.admin import JSON, Admin, Answer
from sidecar.ops.metrics import CONTENT_TYPE

log = logging.getLogger("sidecar.admin")

SUMMED = frozenset({"counter", "histogram", "summary"})
FETCH_TIMEOUT = 5.0  # seconds for one worker's answer (below the usual scrape timeout)
MAX_ANSWER = 16 * 1024 * 1024  # bytes read from one worker's answer


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
    """The supervisor's admin port: the admin server, answering from the workers' endpoints."""

    def __init__(self, workers: dict[str, Address | None]) -> None:
        self.workers = workers  # worker -> its admin address, once it reported it
        self._admin = Admin(self.answer)

    async def start(self, address: Address) -> Address:
        return await self._admin.start(address)

    async def stop(self) -> None:
        await self._admin.stop()

    async def _gather(self, path: str) -> list[WorkerAnswer]:
        return list(
            await asyncio.gather(*(fetch(w, a, path) for w, a in sorted(self.workers.items())))
        )

    async def answer(self, path: str, peer_is_loopback: bool = True) -> Answer:
        """(status, content type, body) for a GET of ``path`` (one of the admin PATHS)."""
        if path == "/metrics":
            answers = await self._gather("/metrics")
            texts = [
                (a.worker, a.body.decode("utf-8", "replace")) for a in answers if a.status == 200
            ]
            return 200, CONTENT_TYPE, merge_expositions(texts)
        if path == "/readyz":
            answers = await self._gather(path)
            status, doc = combine_readiness(answers, detail=peer_is_loopback)
            return status, JSON, json.dumps(doc).encode()
        status, doc = combine_health(await self._gather("/healthz"))
        return status, JSON, json.dumps(doc).encode()
