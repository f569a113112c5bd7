"""Reference: the straightforward Python proxy (aiohttp server + aiohttp client, a static
Authorization header, TLS and keep-alive to the origin). Not the sidecar: a yardstick for it.

    python -m bench.aiohttp_proxy ORIGIN_URL PORT CA_FILE
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import aiohttp
import uvloop
from aiohttp import web


async def serve(origin: str, port: int, ca_file: str) -> None:
    context = ssl.create_default_context(cafile=ca_file)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, ssl=context), auto_decompress=False
    )

    async def handle(request: web.BaseRequest) -> web.Response:
        async with session.request(
            request.method,
            origin + request.rel_url.path_qs,
            headers={"Authorization": "Bearer static-benchmark-token", "Host": "localhost"},
        ) as upstream:
            body = await upstream.read()
            content_type = upstream.headers.get("Content-Type", "application/octet-stream")
            return web.Response(
                body=body, status=upstream.status, headers={"Content-Type": content_type}
            )

    runner = web.ServerRunner(web.Server(handle), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
