"""What a captured connection's first bytes are, before anything is decided: a TLS ClientHello
(its SNI), an HTTP/1.x request head (its Host), or something else. Pure.

The HTTP head is read by llhttp (``httptools``), the parser the listener itself uses, so what
the decision sees is what the listener will parse.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import httptools

from sidecar.proxy.transparent import sni
from sidecar.routing import authority_host

_METHOD = re.compile(rb"^[A-Z]{1,16}( |$)")  # an HTTP request line starts like this


class Peek(NamedTuple):
    """``kind``: "need_more", "tls", "http", "other" or "malformed"; ``name``: the SNI or the
    Host (lower-case, port dropped), None when absent."""

    kind: str
    name: str | None = None


NEED_MORE = Peek("need_more")


class _Head:
    def __init__(self) -> None:
        self.hosts: list[bytes] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            self.hosts.append(value)

    def on_headers_complete(self) -> None:
        self.done = True


def _http(data: bytes, max_head: int) -> Peek:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return NEED_MORE if len(data) <= max_head else Peek("malformed")
    if end > max_head:
        return Peek("malformed")
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(data[: end + 4])
    except httptools.HttpParserUpgrade:
        pass  # the listener refuses upgrades itself; the head was read
    except httptools.HttpParserError:
        return Peek("malformed")
    if not head.done or len(head.hosts) != 1:
        return Peek("malformed")  # RFC 9112 §3.2: exactly one Host
    name = authority_host(head.hosts[0].decode("latin-1"))
    return Peek("http", name) if name else Peek("malformed")


def peek(data: bytes, max_head: int) -> Peek:
    """Classify the first bytes of a connection; heads beyond ``max_head`` are malformed."""
    if not data:
        return NEED_MORE
    if sni.looks_like_tls(data):
        if len(data) > sni.MAX_PEEK:
            return Peek("malformed")
        hello = sni.parse_client_hello(data)
        if hello.state == "need_more":
            return NEED_MORE
        if hello.state == "malformed":
            return Peek("malformed")
        return Peek("tls", hello.server_name)
    if _METHOD.match(data[:17]):
        if len(data) < 17 and b" " not in data:
            return NEED_MORE  # still the method token
        return _http(data, max_head)
    return Peek("other")
