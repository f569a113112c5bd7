"""Transparent capture's pure parts as values: the ClientHello parser (with a bounded fuzz),
the first-bytes peek, SO_ORIGINAL_DST parsing, the decision table, and the rules."""

from __future__ import annotations

import random
import socket
import ssl
import struct

import pytest

from sidecar import config
from sidecar.errors import BadRequest, ConfigError
from sidecar.proxy.transparent import rules, sni
from sidecar.proxy.transparent.capture import OnceAMinute, decide
from sidecar.proxy.transparent.original_dst import OriginalDst, parse_sockaddr
from sidecar.proxy.transparent.peek import Peek, peek
from sidecar.routing import RoutingTable
from tests.test_config import ENV, minimal


def client_hello(server_name: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl / OpenSSL)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    if server_name is None:
        context.check_hostname = False
        tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def record(payload: bytes, ctype: int = 22) -> bytes:
    return bytes([ctype, 3, 1]) + len(payload).to_bytes(2, "big") + payload


def hello_with_extensions(extensions: bytes) -> bytes:
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(extensions).to_bytes(2, "big") + extensions
    return record(b"\x01" + len(body).to_bytes(3, "big") + body)


def sni_extension(*names: bytes, kind: int = 0) -> bytes:
    entries = b"".join(bytes([kind]) + len(n).to_bytes(2, "big") + n for n in names)
    payload = len(entries).to_bytes(2, "big") + entries
    return b"\x00\x00" + len(payload).to_bytes(2, "big") + payload


def test_the_sni_of_a_real_client_hello() -> None:
    data = client_hello("API.Saas.Example")
    assert sni.parse_client_hello(data) == sni.Hello("tls", "api.saas.example")
    assert sni.parse_client_hello(client_hello(None)) == sni.Hello("tls", None)


def test_every_prefix_needs_more_and_never_decides_early() -> None:
    data = client_hello("api.saas.example")
    for end in range(len(data)):
        assert sni.parse_client_hello(data[:end]) == sni.NEED_MORE


def test_a_hello_fragmented_over_records_is_joined() -> None:
    data = client_hello("api.saas.example")
    handshake = data[5:]
    pieces = b"".join(record(handshake[i : i + 7]) for i in range(0, len(handshake), 7))
    assert sni.parse_client_hello(pieces) == sni.Hello("tls", "api.saas.example")


@pytest.mark.parametrize(
    "data",
    [
        record(b"\x02\x00\x00\x01\x00"),  # a ServerHello
        record(b"\x01\x00\x00\x00", ctype=23),  # application data
        bytes([22, 3, 1, 0, 0]),  # an empty record
        bytes([22, 3, 1, 0x40, 0x01]),  # a record longer than TLS allows
        record(b"\x01\x00\x40\x01"),  # a ClientHello longer than MAX_HELLO
        hello_with_extensions(sni_extension(b"a.example", b"b.example")),  # two names
        hello_with_extensions(sni_extension(b"a.example") * 2),  # the extension twice
        hello_with_extensions(sni_extension(b"a.example", kind=1)),  # not a host_name
        hello_with_extensions(sni_extension(b"")),  # empty
        hello_with_extensions(sni_extension(b"a\x00.example")),  # NUL
        hello_with_extensions(sni_extension(b"evil.example/x")),  # not a DNS name
        hello_with_extensions(sni_extension(b"a.example")[:-2] + b"\x00\x09"),  # bad lengths
        hello_with_extensions(b"\x00\x00\x00\x05\x00"),  # an extension cut short
    ],
)
def test_malformed_hellos_fail_closed(data: bytes) -> None:
    assert sni.parse_client_hello(data) == sni.MALFORMED


def test_the_hand_built_hello_is_valid_when_well_formed() -> None:
    # The malformed cases above differ from this one in one field each.
    good = hello_with_extensions(sni_extension(b"a.example"))
    assert sni.parse_client_hello(good) == sni.Hello("tls", "a.example")
    assert sni.parse_client_hello(hello_with_extensions(b"")) == sni.Hello("tls", None)


def test_fuzzed_hellos_never_raise_and_never_invent_a_name() -> None:
    rng = random.Random(19)  # noqa: S311 - a reproducible fuzz, not crypto
    base = client_hello("api.saas.example")
    for _ in range(3000):  # bounded
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        hello = sni.parse_client_hello(bytes(data))
        assert hello.state in ("need_more", "tls", "malformed")
        if hello.server_name is not None:
            assert all(0x21 <= ord(c) < 0x7F for c in hello.server_name)
    for _ in range(500):
        junk = bytes([22, 3]) + rng.randbytes(rng.randrange(1, 400))
        assert sni.parse_client_hello(junk).state in ("need_more", "tls", "malformed")


def test_peek_tells_tls_http_and_other_apart() -> None:
    head = b"GET /v1 HTTP/1.1\r\nHost: API.saas.example:80\r\nAccept: */*\r\n\r\n"
    assert peek(head, 16384) == Peek("http", "api.saas.example")
    assert peek(head[:20], 16384).kind == "need_more"
    assert peek(b"GE", 16384).kind == "need_more"
    assert peek(client_hello("x.example"), 16384) == Peek("tls", "x.example")
    assert peek(b"SSH-2.0-OpenSSH_9.2\r\n", 16384).kind == "other"
    assert peek(b"\x00\x00\x00\x08\x04\xd2\x16\x2f", 16384).kind == "other"  # postgres SSLRequest


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",  # two Hosts
        b"GET / HTTP/1.0\r\n\r\n",  # none
        b"GET / HTTP/1.1\r\nHost: a.example/evil\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example:x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n",  # llhttp refuses
        b"GET / HTTP/1.1\r\nHost: a.example\r\nX: a\rb\r\n\r\n",  # bare CR
    ],
)
def test_malformed_http_heads_fail_closed(head: bytes) -> None:
    assert peek(head, 16384).kind == "malformed"


def test_a_head_larger_than_the_limit_is_malformed() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a.example\r\nX: " + b"a" * 200
    assert peek(head, 100).kind == "malformed"


def test_original_dst_from_sockaddr_bytes() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 80) + bytes([10, 0, 0, 7]) + bytes(8)
    assert parse_sockaddr(v4) == OriginalDst("10.0.0.7", 80)
    addr = socket.inet_pton(socket.AF_INET6, "fd00::5")
    v6 = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 443) + bytes(4) + addr + bytes(4)
    assert parse_sockaddr(v6) == OriginalDst("fd00::5", 443)
    assert str(parse_sockaddr(v6)) == "[fd00::5]:443"
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.1.2.3")
    v6m = (
        struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 8080) + bytes(4) + mapped + bytes(4)
    )
    assert parse_sockaddr(v6m) == OriginalDst("10.1.2.3", 8080)
    for bad in (b"", v4[:7], struct.pack("=H", 1) + bytes(14), v6[:20]):
        with pytest.raises(ValueError, match="sockaddr"):
            parse_sockaddr(bad)


def table(**transparent: object) -> tuple[RoutingTable, config.Transparent]:
    doc = minimal(transparent={"listen": "127.0.0.1:15006", **transparent})
    destinations = doc["destinations"]
    assert isinstance(destinations, list)
    destinations.append({"name": "t", "host": "tunnel.example", "tunnel": True})
    cfg = config.parse(doc, env=ENV)
    assert cfg.transparent is not None
    return RoutingTable(cfg), cfg.transparent


def test_the_decision_table() -> None:
    routing, settings = table()
    routed = routing.routes[next(iter(routing.routes))].destination.host
    dst = OriginalDst("10.0.0.9", 443)
    assert decide(routing, settings, Peek("http", routed), dst)[:2] == ("http", "routed")
    assert decide(routing, settings, Peek("tls", routed), dst)[:2] == ("refuse", "needs_intercept")
    tunnel = decide(routing, settings, Peek("tls", "tunnel.example"), dst)
    assert tunnel[:4] == ("tunnel", "tunnel", "tunnel.example", "t")
    other_port = OriginalDst("10.0.0.9", 8443)  # not in the tunnel's ports: unmatched
    assert (
        decide(routing, settings, Peek("tls", "tunnel.example"), other_port).kind == "passthrough"
    )
    assert decide(routing, settings, Peek("http", "tunnel.example"), dst).kind == "passthrough"
    assert decide(routing, settings, Peek("tls", None), dst).kind == "passthrough"
    assert decide(routing, settings, Peek("other"), dst).kind == "passthrough"
    assert decide(routing, settings, Peek("malformed"), dst)[:2] == ("refuse", "malformed")
    doc = minimal(transparent={})
    destinations = doc["destinations"]
    assert isinstance(destinations, list)
    destinations[0]["intercept"] = True
    intercepting = RoutingTable(config.parse(doc, env=ENV))
    assert decide(intercepting, settings, Peek("tls", routed), dst)[:2] == (
        "intercept",
        "intercepted",
    )
    assert decide(intercepting, settings, Peek("tls", "10.0.0.9"), dst).outcome == "malformed"
    routing, deny = table(unmatched="deny")
    assert decide(routing, deny, Peek("other"), dst)[:2] == ("deny", "denied")
    assert decide(routing, deny, Peek("malformed"), dst).outcome == "malformed"


def test_captured_requests_must_name_the_connections_host() -> None:
    routing, _ = table()
    host = next(iter(routing.routes.values())).destination.host
    resolved = routing.resolve_captured("GET", "/v1/x?y=1", [("Host", f"{host}:80")], host)
    assert resolved.target == ("http", host, 80, "/v1/x", "y=1")
    for target, headers in (
        ("/v1", [("Host", "other.example")]),
        ("/v1", [("Host", host), ("Host", host)]),
        ("/v1", []),
        (f"http://{host}/v1", [("Host", host)]),
        ("/v1#frag", [("Host", host)]),
        ("/a/../b", [("Host", host)]),
    ):
        with pytest.raises(BadRequest):
            routing.resolve_captured("GET", target, headers, host)


def test_once_a_minute_per_key_with_bounded_memory() -> None:
    now = [0.0]
    limiter = OnceAMinute(lambda: now[0])
    assert limiter.due("a")
    assert not limiter.due("a")
    assert limiter.due("b")
    now[0] = 61.0
    assert limiter.due("a")
    for i in range(10_000):
        limiter.due(i)
    assert len(limiter._last) <= 4096


def test_transparent_config_defaults_and_problems() -> None:
    cfg = config.parse(minimal(transparent={}), env=ENV)
    assert cfg.transparent == config.Transparent(config.Address("127.0.0.1", 15006))
    assert config.parse(minimal(), env=ENV).transparent is None
    bad = minimal(
        listen="127.0.0.1:15006",
        transparent={"listen": "0.0.0.0:15006", "unmatched": "allow", "peek_timeout": 0, "x": 1},
    )
    with pytest.raises(ConfigError) as info:
        config.parse(bad, env=ENV)
    text = "\n".join(info.value.problems)
    for where in (
        "transparent.listen",
        "transparent.unmatched",
        "transparent.peek_timeout",
        "transparent.x",
    ):
        assert where in text
    assert "already used" in text


PLAN = rules.Plan(
    port=15006,
    uid=65532,
    exclude_uids=(1337,),
    exclude_cidrs=("10.96.0.0/12", "fd00::/8"),
    exclude_ports=(5432,),
)


def test_install_script_as_values() -> None:
    script = rules.install_script(PLAN, 4, saved="*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")
    assert script.splitlines() == [
        "*nat",
        ":SIDECAR_OUTPUT - [0:0]",
        ":SIDECAR_REDIRECT - [0:0]",
        "-A SIDECAR_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A SIDECAR_OUTPUT -m owner --uid-owner 65532 -j RETURN",
        "-A SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A SIDECAR_OUTPUT -o lo -j RETURN",
        "-A SIDECAR_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "-A SIDECAR_OUTPUT -p tcp --dport 53 -j RETURN",
        "-A SIDECAR_OUTPUT -d 10.96.0.0/12 -j RETURN",
        "-A SIDECAR_OUTPUT -p tcp --dport 5432 -j RETURN",
        "-A SIDECAR_OUTPUT -p tcp -j SIDECAR_REDIRECT",
        "-I OUTPUT 1 -p tcp -j SIDECAR_OUTPUT",
        "COMMIT",
    ]
    v6 = rules.install_script(PLAN, 6, saved="")
    assert "-A SIDECAR_OUTPUT -d ::1/128 -j RETURN" in v6
    assert "-A SIDECAR_OUTPUT -d fd00::/8 -j RETURN" in v6
    assert "10.96" not in v6


def test_install_twice_adds_the_jump_once_and_remove_takes_exactly_ours() -> None:
    saved = (
        "*nat\n:OUTPUT ACCEPT [0:0]\n:SIDECAR_OUTPUT - [0:0]\n:SIDECAR_REDIRECT - [0:0]\n"
        ":ISTIO_OUTPUT - [0:0]\n-A OUTPUT -p tcp -j SIDECAR_OUTPUT\n"
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT\n"
        "-A SIDECAR_OUTPUT -p tcp -j SIDECAR_REDIRECT\nCOMMIT\n"
    )
    assert rules.installed(saved)
    assert "-I OUTPUT" not in rules.install_script(PLAN, 4, saved)
    assert rules.remove_script(saved) == (
        "*nat\n-D OUTPUT -p tcp -j SIDECAR_OUTPUT\n-F SIDECAR_OUTPUT\n-F SIDECAR_REDIRECT\n"
        "-X SIDECAR_OUTPUT\n-X SIDECAR_REDIRECT\nCOMMIT\n"
    )
    assert (
        rules.remove_script(
            "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\nCOMMIT\n"
        )
        is None
    )


def test_include_ports_and_validation() -> None:
    plan = rules.Plan(port=15006, uid=1, include_ports=(80, 8080))
    lines = rules.output_rules(plan, 4)
    assert lines[-2:] == [
        "-A SIDECAR_OUTPUT -p tcp --dport 80 -j SIDECAR_REDIRECT",
        "-A SIDECAR_OUTPUT -p tcp --dport 8080 -j SIDECAR_REDIRECT",
    ]
    bad = rules.Plan(port=0, uid=-1, exclude_cidrs=("10.0.0.0/33",), exclude_ports=(70000,))
    assert len(rules.validate(bad)) == 4
