"""Header hygiene between the app and the upstream. Pure functions (the relay memoises a plan
per header-name sequence; see relayed_block).

RFC 9110 §7.6.1: hop-by-hop headers (Connection and every header it names, Keep-Alive, TE,
Trailer, Transfer-Encoding, Upgrade, Proxy-*) are removed in both directions. The app's own
credentials (Authorization, DPoP) are removed before ours are added: an upstream that sees two
Authorization headers may pick either. Repeated headers keep their order. Host and
Content-Length are the forwarder's: it knows where and how the body is sent. Method and URL
override headers (``X-HTTP-Method-Override`` and kin) are dropped when the route says
``method_override: strip`` (routing refuses them by default).

The data path works on what the parsers give: the app's headers as ``str`` pairs, the origin's
as ``bytes`` pairs, which go back to the app as one pre-encoded block without being decoded.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
APP_CREDENTIALS = frozenset({"authorization", "dpop"})  # what the OAuth kinds set themselves

_FORWARDER_OWN = frozenset({"host", "content-length", "expect"})
# Host is ours to set; Content-Length is the forwarder's; Expect: the sidecar has the body.


def request_drop(credential_headers: frozenset[str]) -> frozenset[str]:
    """The app's header names never forwarded on a route whose kind of credential sets
    ``credential_headers`` (lower-case): computed once per route, not per request."""
    return HOP_BY_HOP | _FORWARDER_OWN | credential_headers


_REQUEST_DROP = request_drop(APP_CREDENTIALS)
_RESPONSE_DROP = frozenset(name.encode() for name in HOP_BY_HOP)


def has_app_credentials(
    headers: Iterable[tuple[str, str]], names: frozenset[str] = APP_CREDENTIALS
) -> bool:
    return any(name.lower() in names for name, _ in headers)


def forwarded(
    headers: Iterable[tuple[str, str]], drop: frozenset[str] = _REQUEST_DROP
) -> list[tuple[str, str]]:
    """The app's headers to send upstream (before Host, Content-Length and credentials);
    ``drop``: from :func:`request_drop` for the route's kind of credential."""
    kept: list[tuple[str, str]] = []
    listed: set[str] | None = None  # names the Connection header lists (rare): hop-by-hop too
    for name, value in headers:
        lower = name.lower()
        if lower in drop or lower.startswith("proxy-"):
            if lower == "connection":
                listed = listed or set()
                listed.update(t.strip().lower() for t in value.split(","))
            continue
        kept.append((name, value))
    if listed:
        kept = [(name, value) for name, value in kept if name.lower() not in listed]
    return kept


_CONNECTION = b"connection"
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})  # lists no other header
_relay_plans: dict[tuple[bytes, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}


def _relay_plan(names: tuple[bytes, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Which of the origin's headers to relay (by position), and where its Connection headers
    are. Origins send the same names in the same order answer after answer: planned once."""
    plan = _relay_plans.get(names)
    if plan is None:
        keep = tuple(
            i for i, n in enumerate(names) if n not in _RESPONSE_DROP and n[:6] != b"proxy-"
        )
        plan = (keep, tuple(i for i, n in enumerate(names) if n == _CONNECTION))
        # Bounded: the names are the origins' to choose. Only usual-sized sequences are kept
        # (at most 256 of them, 2 KiB each); others are planned for every answer.
        if len(names) <= 32 and sum(map(len, names)) <= 2048:
            if len(_relay_plans) >= 256:
                _relay_plans.clear()
            _relay_plans[names] = plan
    return plan


def relayed_block(headers: list[tuple[bytes, bytes]], lowered: list[bytes] | None = None) -> bytes:
    """The origin's headers to send back to the app, as ``Name: value\\r\\n`` lines.
    ``lowered``: the names in lower case, when the caller has them already."""
    names = tuple(lowered) if lowered is not None else tuple(n.lower() for n, _ in headers)
    keep, connections = _relay_plan(names)
    for i in connections:
        if headers[i][1].lower() not in _PLAIN_CONNECTION:
            # Connection names more headers (keep-alive or close alone does not): they are
            # hop-by-hop too.
            listed = {
                token.strip().lower() for j in connections for token in headers[j][1].split(b",")
            }
            keep = tuple(k for k in keep if names[k] not in listed)
            break
    if not keep:
        return b""
    return b"\r\n".join([b": ".join(headers[i]) for i in keep]) + b"\r\n"
