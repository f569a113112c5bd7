"""Admin listener: liveness, readiness and Prometheus metrics (loopback by default).

Served by the data path's own listener (:class:`~sidecar.proxy.listener.Listener`: llhttp,
bounded heads, head and idle timeouts, at most 16 pipelined requests, at most 64 connections,
and the file descriptors the proxy port keeps in reserve), so ``sidecar run``
carries one HTTP stack. Three paths, GET only (405 with ``Allow: GET`` otherwise), JSON answers
as before; the query string is ignored; a request body is never read (the connection is then
closed rather than kept alive).

What the three paths answer comes from an :data:`Endpoints` callable: one process's own state
(:func:`local_endpoints`), or the pod's workers merged (``sidecar run --workers``:
:class:`~sidecar.ops.pod_admin.PodAdmin`). Either way the port is this one server. The admin
port knows nothing of the runtime: it is given callables, so ops does not import the room
above it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from sidecar.config import Address
from sidecar.ops.metrics import CONTENT_TYPE
from sidecar.ops.readiness import Readiness, is_loopback_peer
from sidecar.ops.readiness import response as readiness_response
from sidecar.proxy.admission import Admission
from sidecar.proxy.listener import Listener, Reply, Request

MAX_HEAD_BYTES = 8 * 1024  # a probe's or a scraper's request head is a few hundred bytes
MAX_CONNECTIONS = 64  # kubelet probes and a scraper or two
JSON = "application/json; charset=utf-8"
PATHS = ("/healthz", "/readyz", "/metrics")

ReadinessNow = Callable[[], Readiness]
# (status, content type, body) for a GET of one of PATHS, from (path, peer on loopback).
Answer = tuple[int, str, bytes]
Endpoints = Callable[[str, bool], Awaitable[Answer]]


def local_endpoints(readiness: ReadinessNow, exposition: Callable[[], bytes]) -> Endpoints:
    """This process's own health, readiness and metrics."""

    async def answer(path: str, peer_is_loopback: bool) -> Answer:
        if path == "/healthz":
            # Answering at all proves the event loop is responsive; a blocked loop times the
            # probe out, which is what liveness should catch.
            return 200, JSON, json.dumps({"status": "ok"}).encode()
        if path == "/readyz":
            # Texts for a loopback peer, states for anyone else (ops/readiness.py): injected
            # pods bind this port on all interfaces so the kubelet can probe it.
            status, doc = readiness_response(readiness(), peer_is_loopback=peer_is_loopback)
            return status, JSON, json.dumps(doc).encode()
        return 200, CONTENT_TYPE, exposition()

    return answer


class Admin:
    def __init__(self, endpoints: Endpoints) -> None:
        self._endpoints = endpoints
        # The file descriptors the proxy port leaves free are kept for this port (probes must
        # answer while the app floods the proxy): no reserve here, but few connections.
        admission = Admission(MAX_CONNECTIONS, reserve=False)
        self._listener = Listener(self.handle, max_header_bytes=MAX_HEAD_BYTES, admission=admission)
        self._started = False

    async def start(self, address: Address, *, reuse_port: bool = False) -> Address:
        self._started = True
        return await self._listener.start(address, reuse_port=reuse_port)

    async def stop(self) -> None:
        if self._started:
            await self._listener.stop(grace=1.0)  # answers take microseconds (workers: 5 s)

    async def handle(self, request: Request, reply: Reply) -> None:
        path = request.target.partition("?")[0]
        if path not in PATHS:
            _send_json(reply, 404, {"error": "not_found", "paths": list(PATHS)})
        elif request.method != "GET":
            _send_json(reply, 405, {"error": "method_not_allowed"}, [("Allow", "GET")])
        else:
            status, kind, body = await self._endpoints(path, is_loopback_peer(request.peer_host))
            headers = [("Content-Type", kind), ("Content-Length", str(len(body)))]
            reply.send(status, None, headers, body)


def _send_json(
    reply: Reply, status: int, doc: object, extra: list[tuple[str, str]] | None = None
) -> None:
    body = json.dumps(doc).encode()
    headers = [("Content-Type", JSON), ("Content-Length", str(len(body))), *(extra or [])]
    reply.send(status, None, headers, body)
