"""#16 defect 1 / #15 class 6: a stalled upstream cannot wedge its route.

The wait for a connection slot is bounded (``queue_timeout`` -> 503 ``upstream_busy``; inside
``total_timeout`` -> 504); a request whose app went away while it waited is never sent; a cap on
connections from the app bounds the queue. Real sockets, a real slow upstream on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import cast

import pytest

from sidecar import config
from sidecar.config import Destination
from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.errors import UpstreamBusy, UpstreamTimeout
from sidecar.proxy.flow import Slots
from sidecar.proxy.listener import AppGone, Request
from sidecar.proxy.upstream import Forwarder
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, running_sidecar

WAIT = f"http://{SAAS_HOST}/wait"
URL = f"http://{SAAS_HOST}/v1/invoices"


async def until(condition: Callable[[], bool], what: str) -> None:
    """A bounded poll of an observable count (the sidecar's state across real sockets)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def raw_request(method: str, url: str, body: bytes = b"") -> bytes:
    return (
        f"{method} {url} HTTP/1.1\r\nHost: {SAAS_HOST}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def open_request(
    sidecar: Sidecar, data: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert sidecar.proxy_address is not None
    reader, writer = await asyncio.open_connection(
        sidecar.proxy_address.host, sidecar.proxy_address.port
    )
    writer.write(data)
    await writer.drain()
    return reader, writer


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def saas_slots(sidecar: Sidecar) -> Slots:
    slots = sidecar.forwarder.slots_of("saas")
    assert slots is not None
    return slots


async def test_queued_requests_whose_app_left_are_never_sent_and_the_route_recovers(
    stack: DevStack,
) -> None:
    queued = 20
    async with (
        running_sidecar(
            stack, destination={"max_connections": 2, "queue_timeout": 60, "read_timeout": 60}
        ) as sidecar,
        AppClient(sidecar) as app,
    ):
        assert (await app.request("GET", URL))[0] == 200  # a token, cached: no AS wait below
        # The upstream stalls: two requests take both slots and hang there.
        stalled = [await open_request(sidecar, raw_request("GET", WAIT)) for _ in range(2)]
        for _ in stalled:
            await asyncio.wait_for(stack.saas.started.get(), 10)
        slots = saas_slots(sidecar)
        await until(lambda: slots.free == 0, "both slots taken")
        # The app times out and retries POSTs: the first copies are queued behind the stall.
        waiting = [
            await open_request(sidecar, raw_request("POST", f"{URL}/{n}", b'{"n": 1}'))
            for n in range(queued)
        ]
        await until(lambda: slots.waiting == queued, "all queued")
        text = sidecar.metrics.exposition().decode()
        assert f'sidecar_upstream_queued_requests{{route="saas"}} {float(queued)}' in text
        for _, writer in waiting:
            await close(writer)
        # Each departed request leaves the queue at once (not when a slot frees up).
        await until(lambda: slots.waiting == 0, "the departed left the queue")
        assert slots.free == 0
        # The upstream recovers: the stalled requests complete and give their slots back.
        stack.saas.release.set()
        for reader, writer in stalled:
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            await close(writer)
        await until(lambda: slots.free == 2, "the slots returned")
        # A fresh request goes through at once, and nothing queued ever reached the API.
        status, _, body = await app.request("POST", f"{URL}/fresh", data=b"{}")
        assert status == 200, body
        paths = [seen.raw_path for seen in stack.saas.requests]
        assert paths == ["/v1/invoices", "/wait", "/wait", "/v1/invoices/fresh"]
        assert slots.free == 2
        assert slots.waiting == 0
        text = sidecar.metrics.exposition().decode()  # the dropped ones are counted as such
        assert f'route="saas",status_class="4xx"}} {float(queued)}' in text
        await until(lambda: len(sidecar.listener.connections) <= 1, "app connections closed")


async def test_a_full_route_answers_503_upstream_busy_after_queue_timeout(
    stack: DevStack,
) -> None:
    async with (
        running_sidecar(stack, destination={"max_connections": 1, "queue_timeout": 0.2}) as sc,
        AppClient(sc) as app,
    ):
        assert (await app.request("GET", URL))[0] == 200
        reader, writer = await open_request(sc, raw_request("GET", WAIT))
        await asyncio.wait_for(stack.saas.started.get(), 10)
        await asyncio.wait_for(stack.saas.started.get(), 10)
        status, headers, body = await app.request("POST", f"{URL}/1", data=b"{}")
        assert status == 503, body
        doc = json.loads(body)
        assert doc["error"] == "upstream_busy"
        assert doc["route"] == "saas"
        assert headers["Retry-After"] == "1"
        stack.saas.release.set()
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(
            b"HTTP/1.1 200"
        )
        await close(writer)
        assert [s.raw_path for s in stack.saas.requests] == ["/v1/invoices", "/wait"]
        assert saas_slots(sc).free == 1


class QueuedRequest:
    """The listener's Request as the slot wait sees it (our own seam): is the app there."""

    def __init__(self) -> None:
        self._gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def app_gone(self) -> bool:
        return self._gone.done()

    def gone(self) -> asyncio.Future[None]:
        return self._gone


def destination(**overrides: object) -> Destination:
    doc = {
        "spiffe": {"socket": "unix:///run/agent.sock"},
        "authorization_servers": {"as": {"token_endpoint": "https://as.example/token"}},
        "destinations": [{"host": "api.example", "authorization_server": "as", **overrides}],
    }
    return config.parse(doc, env={}).destinations[0]


async def test_the_slot_wait_counts_in_total_timeout_504() -> None:
    slots = Slots(1)
    assert slots.take_now()  # a stalled request holds the only slot
    dest = destination(total_timeout=0.05, queue_timeout=60)
    request = cast(Request, QueuedRequest())
    with pytest.raises(UpstreamTimeout, match="not sent"):
        await Forwarder._wait_for_slot(request, slots, dest, None)
    assert slots.waiting == 0
    dest = destination(total_timeout=60, queue_timeout=0.05)
    with pytest.raises(UpstreamBusy) as busy:
        await Forwarder._wait_for_slot(request, slots, dest, None)
    assert busy.value.retry_after == 1
    assert slots.waiting == 0


async def test_an_app_that_leaves_while_queued_ends_the_wait_at_once() -> None:
    slots = Slots(1)
    assert slots.take_now()
    queued = QueuedRequest()
    wait = asyncio.create_task(
        Forwarder._wait_for_slot(cast(Request, queued), slots, destination(), None)
    )
    await asyncio.sleep(0)
    assert slots.waiting == 1
    queued.gone().set_result(None)
    with pytest.raises(AppGone):
        await wait
    assert slots.waiting == 0
    slots.give()
    assert slots.free == 1


async def test_connections_beyond_the_cap_are_closed_and_counted(stack: DevStack) -> None:
    async with (
        running_sidecar(stack, limits={"max_app_connections": 3}) as sidecar,
        AppClient(sidecar) as app,
    ):
        assert sidecar.proxy_address is not None
        held = [
            await asyncio.open_connection(sidecar.proxy_address.host, sidecar.proxy_address.port)
            for _ in range(3)
        ]
        await until(lambda: len(sidecar.listener.connections) == 3, "three served")
        reader, writer = await open_request(sidecar, raw_request("GET", URL))
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing answered
        await close(writer)
        assert sidecar.admission.refused["limit"] == 1
        text = sidecar.metrics.exposition().decode()
        assert 'sidecar_app_connections_refused_total{reason="limit"} 1.0' in text
        assert stack.saas.requests == []
        for _, w in held:
            await close(w)
        await until(lambda: len(sidecar.listener.connections) == 0, "held ones closed")
        assert (await app.request("GET", URL))[0] == 200  # below the cap again: served


async def test_requests_stalled_upstream_give_their_slots_back_when_their_app_leaves(
    stack: DevStack,
) -> None:
    """A stalled upstream's slots are not held for read_timeout by requests nobody waits for:
    the route serves again as soon as the upstream does."""
    async with (
        running_sidecar(stack, destination={"max_connections": 2, "read_timeout": 600}) as sc,
        AppClient(sc) as app,
    ):
        assert (await app.request("GET", URL))[0] == 200
        stalled = [await open_request(sc, raw_request("GET", WAIT)) for _ in range(2)]
        slots = saas_slots(sc)
        await until(lambda: slots.free == 0, "both slots taken by the stalled requests")
        for _, writer in stalled:
            await close(writer)
        await until(lambda: slots.free == 2, "the slots came back")
        assert (await app.request("GET", f"{URL}/3"))[0] == 200  # the upstream is not waited out
        text = sc.metrics.exposition().decode()
        assert 'route="saas",status_class="4xx"} 2.0' in text  # recorded as 499 app_gone
