"""Audit: one JSON line per proxied request, plus token issuance and SVID rotation events.

Lines go to the ``sidecar.audit`` logger with ``event`` set, so a SOC can join SPIRE's
issuance log (SPIFFE ID, SVID expiry), the AS's token log (``jti``, ``client_id``) and ours.
What is recorded is chosen field by field: never a token, proof, key or SVID; the query string
only when the config asks for it; for opaque tokens a SHA-256 prefix instead of a ``jti``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("sidecar.audit")


def token_fingerprint(value: str) -> str:
    """A stable, non-reversible reference to an opaque token (first 16 hex of SHA-256)."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


class Exchange:
    """What happened to one request from the app; filled in along the data path. (One per
    request: a plain slotted class, cheaper to make than a dataclass with defaults.)"""

    __slots__ = (
        "answered",
        "cache",
        "error",
        "host",
        "intercepted",
        "method",
        "path",
        "query",
        "retry",
        "route",
        "scopes",
        "started",
        "status",
        "target",
        "token",
        "upstream_seconds",
    )

    def __init__(self, method: str, target: str) -> None:
        self.method = method
        self.target = target  # the raw request target as the app sent it (never logged whole)
        self.started = time.perf_counter()
        self.route: str | None = None
        self.host: str | None = None
        self.path: str | None = None
        self.query: str | None = None
        self.scopes: tuple[str, ...] = ()
        # Safe claims (sub, client_id, jti) or a fingerprint: never the token.
        self.token: Mapping[str, Any] | None = None
        self.cache: str | None = None  # hit | miss
        self.retry: str | None = None  # use_dpop_nonce | invalid_token
        self.status = 0
        self.error: str | None = None
        self.upstream_seconds: float | None = None
        # perf_counter() when the upstream's response headers came (the one relayed)
        self.answered: float | None = None
        self.intercepted = False  # decrypted from an intercepted https:// connection

    def added_seconds(self) -> float | None:
        """What the sidecar added before the relayed answer's headers: from the app's request
        head to those headers, minus the upstream's own time for them (token waits, slot
        queueing, signing, a retry's first round trip); None when nothing was relayed."""
        upstream, answered = self.upstream_seconds, self.answered
        if upstream is None or answered is None:
            return None
        return max(answered - self.started - upstream, 0.0)

    def record(self, spiffe_id: str | None, *, with_query: bool) -> None:
        if not log.isEnabledFor(logging.INFO):
            return  # audit off (log level above info): build nothing
        doc: dict[str, Any] = {
            "event": "request",
            "spiffe_id": spiffe_id,
            "route": self.route,
            "method": self.method,
            "host": self.host,
            "intercepted": self.intercepted or None,
            "path": self.path,
            "scopes": " ".join(self.scopes) if self.scopes else None,
            "status": self.status,
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 2),
            "cache": self.cache,
            "retry": self.retry,
            "error": self.error,
        }
        if with_query and self.query:
            doc["query"] = self.query
        if self.token:
            doc.update({f"token_{k}": v for k, v in self.token.items()})
        log.info("request", extra={k: v for k, v in doc.items() if v is not None})


def token_reference(claims: Mapping[str, Any], value: str) -> dict[str, Any]:
    """The token's identity for the audit line: JWT claims, or a fingerprint when opaque."""
    picked = {k: claims[k] for k in ("sub", "client_id", "jti") if k in claims}
    if "jti" not in picked:
        picked["sha256"] = token_fingerprint(value)
    return picked
