"""An origin that closes mid-stream (issue 15): the app's connection is closed or answered 502,
and no future is left with an exception nobody retrieved (asyncio would log it at error)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from sidecar.devstack.stack import SAAS_HOST, DevStack
from tests.conftest import AppClient, LogCapture, running_sidecar

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def close_after_the_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.close()


async def close_mid_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 70000)
    await writer.drain()
    writer.close()


async def close_mid_chunked_response(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    writer.close()


@pytest.mark.parametrize(
    "serve", [close_after_the_head, close_mid_response, close_mid_chunked_response]
)
@pytest.mark.parametrize("streamed_body", [False, True])
async def test_an_origin_closing_mid_stream_leaves_no_unretrieved_exception(
    stack: DevStack, logs: LogCapture, serve: Serve, streamed_body: bool
) -> None:
    tls = stack.ca.issue_server("localhost", "127.0.0.1").server_context()
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            running_sidecar(stack, destination={"upstream": f"https://127.0.0.1:{port}"}) as sc,
            AppClient(sc) as app,
        ):

            async def body() -> AsyncIterator[bytes]:
                for _ in range(64):
                    yield b"b" * 65536

            data = body() if streamed_body else b"{}"
            try:
                status, _, _ = await app.request("POST", f"http://{SAAS_HOST}/v1/x", data=data)
                assert status in (200, 502)
            except aiohttp.ClientError:
                pass  # the answer had started: the app sees its connection cut
    finally:
        server.close()
    gc.collect()  # a future whose exception nobody retrieved is reported when collected
    await asyncio.sleep(0)
    never = [r for r in logs.records if "never retrieved" in r.getMessage()]
    assert never == []
