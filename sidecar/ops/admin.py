"""Admin listener: liveness, readiness and Prometheus metrics (loopback by default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from sidecar.config import Address
from sidecar.ops.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from sidecar.runtime import Sidecar


class Admin:
    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        self._runner = web.AppRunner(app, access_log=None)
        self._started = False

    async def start(self, address: Address, *, reuse_port: bool = False) -> Address:
        await self._runner.setup()
        self._started = True
        site = web.TCPSite(self._runner, address.host, address.port, reuse_port=reuse_port or None)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None)
        assert sockets
        host, port = sockets[0].getsockname()[:2]
        return Address(host, port)

    async def stop(self) -> None:
        if self._started:
            await self._runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the event loop is responsive; a blocked loop times the
        # probe out, which is what liveness should catch.
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        body = self._sidecar.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, problems = self._sidecar.readiness()
        body = {"ready": ready, "problems": problems}
        return web.json_response(body, status=200 if ready else 503)
