"""The listener's HTTP/1.1 behaviour on the wire: keep-alive, pipelining, HTTP/1.0, Expect,
upgrades, and what happens to bodies that are not read or are cut."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.proxy.listener import (
    BODY_IDLE_TIMEOUT,
    HEAD_TIMEOUT,
    KEEPALIVE_IDLE,
    Listener,
    Reply,
    Request,
    _Connection,
)
from tests.conftest import AppClient

GET = f"GET http://{SAAS_HOST}/v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"


async def exchange(app: AppClient, data: bytes, *, then: bytes | None = None) -> bytes:
    """Send raw bytes (and optionally more after the first answer began); read until EOF."""
    reader, writer = await asyncio.open_connection(app.address.host, app.address.port)
    try:
        writer.write(data)
        await writer.drain()
        if then is not None:
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(then)
            await writer.drain()
            return first + await asyncio.wait_for(reader.read(), 10)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def statuses(answer: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(
    stack: DevStack, app: AppClient
) -> None:
    pipelined = (
        f"GET http://{SAAS_HOST}/status/201 HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n"
        f"GET http://{SAAS_HOST}/status/202 HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n"
        f"GET http://{SAAS_HOST}/status/203 HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    answer = await exchange(app, pipelined)
    assert statuses(answer) == [201, 202, 203]
    assert [seen.raw_path for seen in stack.saas.requests] == [
        "/status/201",
        "/status/202",
        "/status/203",
    ]
    assert answer.count(b"Connection: close") == 1  # only the last one closes


async def test_http_1_0_gets_its_answer_and_the_connection_closes(
    stack: DevStack, app: AppClient
) -> None:
    answer = await exchange(app, f"GET http://{SAAS_HOST}/v1/invoices HTTP/1.0\r\n\r\n".encode())
    assert statuses(answer) == [200]
    assert b"Transfer-Encoding: chunked" not in answer


async def test_expect_100_continue_is_honoured(stack: DevStack, app: AppClient) -> None:
    body = b'{"amount": 7}'
    head = (
        f"POST http://{SAAS_HOST}/v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = await exchange(app, head, then=body)
    assert statuses(answer)[:2] == [100, 200]
    assert stack.saas.requests[-1].body_len == len(body)
    names = [name.lower() for name, _ in stack.saas.requests[-1].headers]
    assert "expect" not in names  # the sidecar has the body; the origin is not asked again


async def test_protocol_upgrades_are_refused(stack: DevStack, app: AppClient) -> None:
    answer = await exchange(
        app,
        (GET + "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n").encode(),
    )
    assert statuses(answer) == [400]
    assert b"upgrade" in answer.lower()
    assert stack.saas.requests == []


async def test_an_unread_body_closes_the_connection_instead_of_desyncing_it(
    stack: DevStack, app: AppClient
) -> None:
    # Refused before its body is read (unknown destination); the "body" holds a request.
    smuggled = f"GET http://{SAAS_HOST}/v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n"
    head = (
        "POST http://unknown.example/ HTTP/1.1\r\nHost: unknown.example\r\n"
        f"Content-Length: {len(smuggled) + 100000}\r\n\r\n"
    ).encode()
    answer = await exchange(app, head + smuggled.encode())
    assert statuses(answer) == [403]
    assert stack.saas.requests == []


async def test_a_chunked_body_cut_by_a_framing_error_is_never_sent_as_complete(
    stack: DevStack, app: AppClient
) -> None:
    head = (
        f"POST http://{SAAS_HOST}/v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    answer = await exchange(app, head + b"5\r\nhello\r\nZZZ-not-a-size\r\n\r\n")
    assert all(status != 200 for status in statuses(answer))
    assert all(seen.status != 200 for seen in stack.saas.requests)


async def test_head_requests_get_headers_without_a_body(stack: DevStack, app: AppClient) -> None:
    answer = await exchange(
        app,
        f"HEAD http://{SAAS_HOST}/v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert statuses(head) == [200]
    assert body == b""


async def test_content_length_zero_is_passed_on(stack: DevStack, app: AppClient) -> None:
    answer = await exchange(
        app,
        f"POST http://{SAAS_HOST}/v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
    )
    assert statuses(answer) == [200]
    assert ("Content-Length", "0") in stack.saas.requests[-1].headers


async def test_http_1_0_keep_alive_is_acknowledged(stack: DevStack, app: AppClient) -> None:
    reader, writer = await asyncio.open_connection(app.address.host, app.address.port)
    try:
        for _ in range(2):  # the same connection twice
            request = f"GET http://{SAAS_HOST}/v1/invoices HTTP/1.0\r\nConnection: keep-alive"
            writer.write(f"{request}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert b"Connection: keep-alive" in head
            match = re.search(rb"Content-Length: (\d+)", head)
            assert match is not None
            length = int(match.group(1))
            await reader.readexactly(length)
    finally:
        writer.close()
    assert len(stack.saas.requests) == 2


# -- expiry, decided by the protocol alone (fed bytes directly, clock values given) -------------


def _connection() -> tuple[Listener, Any]:
    reading = asyncio.Event()

    async def handler(request: Request, reply: Reply) -> None:
        reading.set()
        await request.read()

    listener = Listener(handler, max_header_bytes=16384)
    conn = _Connection(listener, 15001)
    conn.reading = reading  # type: ignore[attr-defined]
    return listener, conn


async def test_a_head_that_never_finishes_expires() -> None:
    _, conn = _connection()
    conn.data_received(b"GET http://a.example/ HTTP/1.1\r\nHost: a.exa")
    now = time.monotonic()
    assert not conn.expired(now)
    assert conn.expired(now + HEAD_TIMEOUT + 1)


async def test_an_idle_keep_alive_connection_expires() -> None:
    _, conn = _connection()
    assert not conn.expired(conn.last_activity + KEEPALIVE_IDLE - 1)
    assert conn.expired(conn.last_activity + KEEPALIVE_IDLE + 1)


async def test_a_body_that_stops_arriving_expires_but_a_slow_answer_does_not() -> None:
    listener, conn = _connection()
    conn.data_received(
        b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"
    )
    await asyncio.wait_for(conn.reading.wait(), 5)
    await asyncio.sleep(0)  # one loop turn: the handler is now waiting for the rest of the body
    now = time.monotonic()
    assert not conn.expired(now + BODY_IDLE_TIMEOUT - 5)
    assert conn.expired(now + BODY_IDLE_TIMEOUT + 1)
    conn.data_received(b"defghij")  # the rest arrives: the handler finishes
    await asyncio.wait_for(listener._idle.wait(), 5)
    # Now an idle keep-alive connection: only KEEPALIVE_IDLE (longer) applies.
    assert not conn.expired(time.monotonic() + BODY_IDLE_TIMEOUT + 1)
    await listener.stop(0)
