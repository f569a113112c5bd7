"""The lean origin client against a scripted origin: real TLS on loopback, raw HTTP/1.1 bytes,
so the awkward answers real servers give can be produced on purpose."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from sidecar.devstack.pki import DevCA
from sidecar.proxy.origin_client import (
    MAX_HEAD_BYTES,
    Origin,
    OriginBroken,
    OriginRefused,
    OriginTimeout,
    Pool,
    Timeouts,
)

Answer = Callable[[bytes], bytes | None]  # request head -> raw answer (None: close)
Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Start = Callable[..., Awaitable["ScriptedOrigin"]]


@dataclass
class ScriptedOrigin:
    """Reads one request head at a time and writes whatever ``answer`` returns."""

    answer: Answer
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)
                out = self.answer(head)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture
def ca() -> DevCA:
    return DevCA()


@pytest.fixture
async def scripted(ca: DevCA) -> AsyncIterator[Start]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer, serve: Serve | None = None) -> ScriptedOrigin:
        origin = ScriptedOrigin(answer)
        tls = ca.issue_server("localhost", "127.0.0.1").server_context()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            origin.connections += 1
            await (serve or origin.serve)(reader, writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        origin.port = server.sockets[0].getsockname()[1]
        return origin

    yield start
    for server in servers:
        server.close()


def origin_for(ca: DevCA, scripted_origin: ScriptedOrigin) -> Origin:
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    return Origin("127.0.0.1", scripted_origin.port, context, allow_private=True)


TIMEOUTS = Timeouts(connect=5.0, read=5.0)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


async def get(pool: Pool, origin: Origin, method: str = "GET", **kw: object) -> tuple[int, bytes]:
    resp = await pool.request(origin, method, "/x", [("Host", "origin")], None, None, TIMEOUTS)
    body = await resp.read()
    resp.release()
    return resp.status, body


async def test_keep_alive_connections_are_reused(ca: DevCA, scripted: Start) -> None:
    origin = await scripted(lambda head: OK)
    pool = Pool()
    target = origin_for(ca, origin)
    for _ in range(5):
        assert await get(pool, target) == (200, b"ok")
    assert origin.connections == 1
    await pool.close()


async def test_head_answers_are_not_mistaken_for_bodies_and_close(
    ca: DevCA, scripted: Start
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    origin = await scripted(lambda h: head if h.startswith(b"HEAD") else OK)
    pool = Pool()
    target = origin_for(ca, origin)
    resp = await pool.request(target, "HEAD", "/x", [], None, None, TIMEOUTS)
    assert (resp.status, resp.content_length, await resp.read()) == (200, 1234, b"")
    resp.release()
    assert await get(pool, target) == (200, b"ok")
    assert origin.connections == 2  # a HEAD answer's connection is not reused
    await pool.close()


async def test_a_pooled_connection_the_origin_closed_is_retried_once(
    ca: DevCA, scripted: Start
) -> None:
    answers = iter([OK, None, OK])  # answer, then close the idle connection, then answer
    origin = await scripted(lambda head: next(answers))
    pool = Pool()
    target = origin_for(ca, origin)
    assert await get(pool, target) == (200, b"ok")
    assert await get(pool, target) == (200, b"ok")  # the closed one failed; a fresh one worked
    assert origin.connections == 2
    await pool.close()


async def test_interim_responses_are_skipped(ca: DevCA, scripted: Start) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + OK
    origin = await scripted(lambda head: early)
    pool = Pool()
    assert await get(pool, origin_for(ca, origin)) == (200, b"ok")
    await pool.close()


async def test_a_body_that_ends_with_the_connection_is_read_to_the_end(
    ca: DevCA, scripted: Start
) -> None:
    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil-close")
        await writer.drain()
        writer.close()

    origin = await scripted(lambda head: None, answer_then_close)
    pool = Pool()
    target = origin_for(ca, origin)
    resp = await pool.request(target, "GET", "/x", [], None, None, TIMEOUTS)
    assert resp.content_length is None
    assert await resp.read() == b"until-close"
    resp.release()
    await pool.close()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "not valid HTTP/1.1"),
        (
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n",
            "too large",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
            "switched",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed"),
        (b"HTTP/1.1 200 " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n", "too large"),
    ],
    ids=["garbage", "huge-head", "upgrade", "truncated", "huge-status-line"],
)
async def test_answers_that_are_not_clean_http_fail_the_exchange(
    ca: DevCA, scripted: Start, raw: bytes, message: str
) -> None:
    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        writer.close()

    origin = await scripted(lambda head: None, once_then_close)
    pool = Pool()

    async def exchange() -> None:
        resp = await pool.request(origin_for(ca, origin), "GET", "/x", [], None, None, TIMEOUTS)
        try:
            await resp.read()
        finally:
            resp.release()

    with pytest.raises(OriginBroken, match=message):
        await exchange()
    await pool.close()


async def test_bytes_after_the_answer_poison_the_connection_not_the_next_request(
    ca: DevCA, scripted: Start
) -> None:
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
    answers = iter([OK + smuggled, OK])
    origin = await scripted(lambda head: next(answers))
    pool = Pool()
    target = origin_for(ca, origin)
    assert await get(pool, target) == (200, b"ok")
    assert await get(pool, target) == (200, b"ok")  # not the smuggled answer
    assert origin.connections == 2  # the desynchronised connection was dropped
    await pool.close()


async def test_header_values_with_line_breaks_are_never_sent(ca: DevCA, scripted: Start) -> None:
    origin = await scripted(lambda head: OK)
    pool = Pool()
    with pytest.raises(OriginBroken, match="line break"):
        await pool.request(
            origin_for(ca, origin),
            "GET",
            "/x",
            [("Authorization", "DPoP tok\r\nX-Injected: 1")],
            None,
            None,
            TIMEOUTS,
        )
    assert origin.heads == []
    await pool.close()


async def test_a_silent_origin_times_out(ca: DevCA, scripted: Start) -> None:
    hang = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await hang.wait()
        writer.close()

    origin = await scripted(lambda head: OK, silent)
    pool = Pool()
    with pytest.raises(OriginTimeout):
        await pool.request(
            origin_for(ca, origin), "GET", "/x", [], None, None, Timeouts(connect=5, read=0.2)
        )
    hang.set()
    await pool.close()


async def test_a_shorter_timeout_on_a_reused_connection_still_applies(
    ca: DevCA, scripted: Start
) -> None:
    """The connection's timer was armed for the first request's long timeout; the second,
    shorter one must not wait for it (nor for the connect timeout)."""
    hang = asyncio.Event()
    answered = 0

    async def once_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        answered += 1
        await reader.readuntil(b"\r\n\r\n")
        await hang.wait()
        writer.close()

    origin = await scripted(lambda head: OK, once_then_silent)
    target = origin_for(ca, origin)
    pool = Pool()
    long = Timeouts(connect=5, read=3600)
    resp = await pool.request(target, "GET", "/x", [], None, None, long)
    assert (resp.status, await resp.read()) == (200, b"ok")
    resp.release()
    with pytest.raises(OriginTimeout):
        await asyncio.wait_for(
            pool.request(target, "GET", "/x", [], None, None, Timeouts(connect=3600, read=0.2)),
            30,  # a guard: were the long timer in charge, this would fail instead
        )
    assert (origin.connections, answered) == (1, 1)  # the same, reused connection
    hang.set()
    await pool.close()


async def test_loopback_is_refused_unless_allowed(ca: DevCA, scripted: Start) -> None:
    origin = await scripted(lambda head: OK)
    guarded = Origin("localhost", origin.port, None, allow_private=False)
    with pytest.raises(OriginRefused, match="allow_private"):
        await Pool().request(guarded, "GET", "/x", [], None, None, TIMEOUTS)
    assert origin.connections == 0


def test_origins_hash_by_value_as_pool_keys() -> None:
    # Origin hashes once at construction: equal origins are one pool key, different ones not.
    import ssl as ssl_module

    from sidecar.proxy.origin_client import Origin

    context = ssl_module.create_default_context()
    a, b = Origin("api.example", 443, context, False), Origin("api.example", 443, context, False)
    assert a == b
    assert hash(a) == hash(b)
    assert {a: 1}[b] == 1
    others = [
        Origin("api.example", 8443, context, False),
        Origin("api.example", 443, ssl_module.create_default_context(), False),
        Origin("api.example", 443, context, True),
        Origin("api.example", 443, context, False, absolute=True),
    ]
    assert all(o != a for o in others)
    assert len({a, *others}) == 5
