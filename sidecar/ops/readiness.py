"""Readiness: what ``/readyz`` and ``sidecar_route_ready`` say, from what the data path sees now.

Pure functions. A route is *ready* when it holds a usable token or its last token request
succeeded (a token that lapsed while the route was idle is fetched again on demand). The pod's
status follows the ``readiness`` policy (config/README.md):

- ``startup`` (default): ready once every route got a token once under the config in force;
  later authorization-server blips do not flip the pod unready (an egress sidecar flipping
  its pod unready on an AS blip can cause an outage of its own). Requests still fail closed.
- ``strict``: unready while any route is not ready.

Either way the pod is unready without a usable identity (no SVID, or the held X.509-SVID is
past ``notAfter``), before the config is loaded and while shutting down.

The body beyond loopback (the admin port may be bound to all interfaces in injected pods)
carries states only; texts, which name sockets and error codes, are for loopback peers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.config import ReadinessPolicy as Policy

RouteState = Literal["ready", "stale", "idle", "pending", "failing"]
READY_STATES = frozenset({"ready", "stale", "idle"})


@dataclass(frozen=True)
class RouteReadiness:
    state: RouteState
    reason: str
    ever_ok: bool = False  # some token request for it succeeded under the config in force

    @property
    def ready(self) -> bool:
        return self.state in READY_STATES


@dataclass(frozen=True)
class Readiness:
    ready: bool
    identity: str  # ready, starting, waiting, unavailable, expired
    identity_reason: str | None
    routes: Mapping[str, RouteReadiness]
    problems: Mapping[str, tuple[str, str]]  # what keeps the pod unready: (state, reason)


def route_readiness(
    *, holds_token: bool, last_ok: bool | None, last_reason: str = "", ever_ok: bool = False
) -> RouteReadiness:
    """One route's state. ``last_ok`` is how its last token request ended (None: none yet);
    ``last_reason`` is an error code or our own sentence, never a peer's text."""
    if holds_token and last_ok is not False:
        return RouteReadiness("ready", "holds a usable token", ever_ok)
    if holds_token:
        return RouteReadiness(
            "stale", f"holds a usable token; its last refresh failed ({last_reason})", ever_ok
        )
    if last_ok is None:
        return RouteReadiness("pending", "no token requested yet", ever_ok)
    if last_ok:
        return RouteReadiness("idle", "no token held; its last token request succeeded", ever_ok)
    return RouteReadiness(
        "failing", f"no usable token; its last token request failed ({last_reason})", ever_ok
    )


def evaluate(
    *,
    policy: Policy,
    stopping: bool,
    loaded: bool,
    identity: tuple[str, str] | None,
    routes: Mapping[str, RouteReadiness],
) -> Readiness:
    """The pod's readiness. ``identity``: (state, reason) when it is not usable, else None."""
    problems: dict[str, tuple[str, str]] = {}
    if stopping:
        problems["sidecar"] = ("stopping", "shutting down")
    if not loaded:
        problems["config"] = ("starting", "not loaded yet")
    if identity is not None:
        problems["identity"] = identity
    for name, route in sorted(routes.items()):
        blocking = not route.ready if policy == "strict" else not route.ever_ok
        if blocking:
            problems[f"route {name}"] = (route.state, route.reason)
    return Readiness(
        ready=not problems,
        identity="ready" if identity is None else identity[0],
        identity_reason=None if identity is None else identity[1],
        routes=routes,
        problems=problems,
    )


def response(readiness: Readiness, *, peer_is_loopback: bool) -> tuple[int, dict[str, Any]]:
    """The ``/readyz`` status and body: texts for loopback peers, states for everyone else."""
    pick = 1 if peer_is_loopback else 0
    body: dict[str, Any] = {
        "ready": readiness.ready,
        "problems": {k: v[pick] for k, v in readiness.problems.items()},
        "identity": readiness.identity,
        "routes": {
            name: {"state": r.state, "reason": r.reason} if peer_is_loopback else r.state
            for name, r in sorted(readiness.routes.items())
        },
    }
    return (200 if readiness.ready else 503), body


def is_loopback_peer(host: str | None) -> bool:
    """Whether the admin port's peer address is loopback (IPv4-mapped IPv6 included).
    Unknown or unparsable peers (a unix socket, None) count as remote: states only."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
