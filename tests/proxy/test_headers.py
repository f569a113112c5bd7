"""Header hygiene both ways."""

from sidecar.proxy.headers import forwarded, relayed_block


def test_request_headers_strip_hop_by_hop_credentials_and_listed() -> None:
    incoming = [
        ("Host", "app-chosen"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("Keep-Alive", "5"),
        ("TE", "trailers"),
        ("Trailer", "x"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Proxy-Foo", "1"),
        ("X-Secret-Hop", "1"),
        ("Authorization", "Bearer static-secret"),
        ("DPoP", "x"),
        ("Content-Length", "3"),
        ("Accept", "a"),
        ("X-Multi", "1"),
        ("X-Multi", "2"),
        ("Cookie", "c=1"),
    ]
    # Host is not the app's to choose: the forwarder sends the route's (tests/test_upstream.py).
    assert forwarded(incoming) == [
        ("Accept", "a"),
        ("X-Multi", "1"),
        ("X-Multi", "2"),
        ("Cookie", "c=1"),
    ]


def test_response_headers_strip_hop_by_hop_and_keep_repeats() -> None:
    incoming = [
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Content-Type", "text/plain"),
    ]
    raw = [(name.encode(), value.encode()) for name, value in incoming]
    assert (
        relayed_block(raw) == b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Type: text/plain\r\n"
    )


def test_relayed_block_plans_by_names_but_checks_connection_each_time() -> None:
    plain = [(b"Server", b"x"), (b"X-Hop", b"1"), (b"Connection", b"keep-alive")]
    listed = [(b"Server", b"x"), (b"X-Hop", b"1"), (b"Connection", b"X-Hop")]
    # Same names in the same order: one plan, but the Connection value still decides.
    assert relayed_block(plain) == b"Server: x\r\nX-Hop: 1\r\n"
    assert relayed_block(listed) == b"Server: x\r\n"
    assert relayed_block(plain) == b"Server: x\r\nX-Hop: 1\r\n"
    assert relayed_block([(b"Keep-Alive", b"5"), (b"Proxy-Foo", b"1")]) == b""
    lowered = [b"set-cookie", b"set-cookie"]
    assert (
        relayed_block([(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")], lowered)
        == b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
    )


def test_relay_plans_stay_bounded_whatever_names_origins_choose() -> None:
    from sidecar.proxy import headers

    for i in range(600):
        assert relayed_block([(f"X-Random-{i}".encode(), b"v")]) == f"X-Random-{i}: v\r\n".encode()
    assert len(headers._relay_plans) <= 256
    huge = [(b"X-" + b"n" * 3000, b"v")]
    relayed_block(huge)
    assert tuple(n.lower() for n, _ in huge) not in headers._relay_plans
