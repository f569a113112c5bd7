"""The transparent listener on loopback, without any nat rule: a connection that was not
redirected (someone dialled the port itself) is closed unanswered, never relayed to its
"original destination" (that would be the listener itself: a loop)."""

from __future__ import annotations

import asyncio
import socket

from sidecar.devstack.stack import DevStack
from tests.conftest import running_sidecar


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_a_connection_that_was_not_redirected_is_closed(stack: DevStack) -> None:
    transparent = {"listen": f"127.0.0.1:{free_port()}", "ipv6": False}
    async with running_sidecar(stack, transparent=transparent) as sidecar:
        (address,) = sidecar.transparent_addresses
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(b"GET /v1/invoices HTTP/1.1\r\nHost: api.saas.example\r\n\r\n")
        assert await reader.read() == b""  # closed, nothing said
        writer.close()
        value = sidecar.metrics.registry.get_sample_value(
            "sidecar_transparent_connections_total", {"outcome": "not_redirected"}
        )
        assert value == 1
        assert stack.saas.requests == []
