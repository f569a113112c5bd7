"""Header hygiene between the app and the upstream. Pure functions.

RFC 9110 §7.6.1: hop-by-hop headers (Connection and every header it names, Keep-Alive, TE,
Trailer, Transfer-Encoding, Upgrade, Proxy-*) are removed in both directions. The app's own
credentials (Authorization, DPoP) are removed before ours are added: aiohttp
would otherwise send only one of two Authorization headers, silently. Repeated headers keep
their order. Content-Length is left to the forwarder, which knows how the body is sent.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

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
APP_CREDENTIALS = frozenset({"authorization", "dpop"})


def _connection_listed(lowered: list[tuple[str, str, str]]) -> frozenset[str]:
    listed: set[str] = set()
    for lower, _, value in lowered:
        if lower == "connection":
            listed.update(t.strip().lower() for t in value.split(",") if t.strip())
    return frozenset(listed)


def has_app_credentials(headers: Iterable[tuple[str, str]]) -> bool:
    return any(name.lower() in APP_CREDENTIALS for name, _ in headers)


_REQUEST_DROP = HOP_BY_HOP | APP_CREDENTIALS | {"host", "content-length", "expect"}
# Host is ours to set; Content-Length is the forwarder's; Expect: the sidecar has the body.


def request_headers(headers: Iterable[tuple[str, str]], host: str) -> CIMultiDict[str]:
    """What to send upstream, before our Authorization/DPoP are added."""
    lowered = [(name.lower(), name, value) for name, value in headers]
    listed = _connection_listed(lowered)
    out: CIMultiDict[str] = CIMultiDict()
    out["Host"] = host
    for lower, name, value in lowered:
        if lower in _REQUEST_DROP or lower in listed or lower.startswith("proxy-"):
            continue
        out.add(name, value)
    return out


def response_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """What to send back to the app."""
    lowered = [(name.lower(), name, value) for name, value in headers]
    listed = _connection_listed(lowered)
    out: CIMultiDict[str] = CIMultiDict()
    for lower, name, value in lowered:
        if lower in HOP_BY_HOP or lower in listed or lower.startswith("proxy-"):
            continue
        out.add(name, value)
    return out
