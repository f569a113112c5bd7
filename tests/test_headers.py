"""Header hygiene both ways."""

from sidecar.headers import request_headers, response_headers


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
    out = request_headers(incoming, "api.example:8443")
    assert list(out.items()) == [
        ("Host", "api.example:8443"),
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
    assert list(response_headers(incoming).items()) == [
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Content-Type", "text/plain"),
    ]
