"""The server name of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3), read from the first
bytes of a connection before deciding what to do with it. Pure and bounded: at most
:data:`MAX_HELLO` bytes are ever needed; malformed input is an answer (``MALFORMED``), never an
exception, so the caller fails closed.

Only the first handshake message is read; it may span several records (RFC 8446 §5.1: a
handshake message may be fragmented), which are joined. Nothing is decrypted or kept.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_HELLO = 16 * 1024  # a ClientHello longer than one full record is refused
MAX_PEEK = 32 * 1024  # bytes read before giving up on a ClientHello (tiny records)
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0


class Hello(NamedTuple):
    """``state``: "need_more", "tls" (``server_name`` may be None: no SNI) or "malformed"."""

    state: str
    server_name: str | None = None


NEED_MORE = Hello("need_more")
MALFORMED = Hello("malformed")


def looks_like_tls(data: bytes) -> bool:
    """A TLS handshake record: content type 22, legacy version 3.x."""
    return len(data) >= 1 and data[0] == _HANDSHAKE and (len(data) < 2 or data[1] == 3)


def _handshake_bytes(data: bytes) -> bytes | None:
    """The handshake bytes carried by the leading records, joined (the last one may be cut
    short: more is to come), or None when a record header is not a TLS handshake's."""
    out = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5])
        if ctype != _HANDSHAKE or major != 3 or length == 0 or length > 16384:
            return None
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return bytes(out)


def parse_client_hello(data: bytes) -> Hello:
    """What the bytes received so far say about the ClientHello. The caller stops waiting
    for more at :data:`MAX_PEEK` bytes (then: malformed)."""
    if not data:
        return NEED_MORE
    if not looks_like_tls(data):
        return MALFORMED
    joined = _handshake_bytes(data)
    if joined is None:
        return MALFORMED
    if len(joined) < 4:
        return NEED_MORE
    if joined[0] != _CLIENT_HELLO:
        return MALFORMED
    length = int.from_bytes(joined[1:4])
    if length > MAX_HELLO:
        return MALFORMED
    if len(joined) < 4 + length:
        return NEED_MORE
    return _server_name(memoryview(joined)[4 : 4 + length])


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size))

    def vector(self, size: int) -> memoryview:
        return self.take(self.number(size))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _server_name(body: memoryview) -> Hello:
    try:
        r = _Reader(body)
        r.take(2 + 32)  # legacy_version, random
        r.vector(1)  # legacy_session_id
        suites = r.vector(2)
        if len(suites) < 2 or len(suites) % 2:
            return MALFORMED
        if len(r.vector(1)) < 1:  # legacy_compression_methods
            return MALFORMED
        if r.left == 0:
            return Hello("tls")  # no extensions at all (TLS 1.2 allows it): no SNI
        extensions = _Reader(r.vector(2))
        if r.left:
            return MALFORMED  # bytes after the extensions
        name: str | None = None
        seen: set[int] = set()
        while extensions.left:
            kind = extensions.number(2)
            payload = extensions.vector(2)
            if kind in seen:
                return MALFORMED  # RFC 8446 §4.2: at most one extension of each type
            seen.add(kind)
            if kind == _SERVER_NAME:
                name = _host_name(_Reader(payload))
                if name is None:
                    return MALFORMED
        return Hello("tls", name)
    except ValueError:
        return MALFORMED


def _host_name(r: _Reader) -> str | None:
    """RFC 6066 §3: a list with exactly one host_name, an ASCII DNS name without trailing dot."""
    names = _Reader(r.vector(2))
    if r.left:
        return None
    found: str | None = None
    while names.left:
        kind = names.number(1)
        value = bytes(names.vector(2))
        if kind != _HOST_NAME or found is not None or not 0 < len(value) <= 253:
            return None
        if not all(0x21 <= b < 0x7F and b not in b"/\\@:?#[]" for b in value):
            return None
        found = value.decode("ascii").lower().rstrip(".")
        if not found:
            return None
    return found
