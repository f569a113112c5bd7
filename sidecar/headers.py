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


def _connection_listed(headers: Iterable[tuple[str, str]]) -> set[str]:
    listed: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            listed.update(t.strip().lower() for t in value.split(",") if t.strip())
    return listed


def _is_hop(name: str, listed: set[str]) -> bool:
    return name in HOP_BY_HOP or name.startswith("proxy-") or name in listed


def has_app_credentials(headers: Iterable[tuple[str, str]]) -> bool:
    return any(name.lower() in APP_CREDENTIALS for name, _ in headers)


def request_headers(headers: Iterable[tuple[str, str]], host: str) -> CIMultiDict[str]:
    """What to send upstream, before our Authorization/DPoP are added."""
    pairs = list(headers)
    listed = _connection_listed(pairs)
    out: CIMultiDict[str] = CIMultiDict()
    out["Host"] = host
    for name, value in pairs:
        lower = name.lower()
        if (
            _is_hop(lower, listed)
            or lower in APP_CREDENTIALS
            or lower in ("host", "content-length", "expect")  # the sidecar has the body already
        ):
            continue
        out.add(name, value)
    return out


def response_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """What to send back to the app."""
    pairs = list(headers)
    listed = _connection_listed(pairs)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in pairs:
        if not _is_hop(name.lower(), listed):
            out.add(name, value)
    return out
