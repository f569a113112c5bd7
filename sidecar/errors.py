"""The errors the legacy app can see, and the one place that turns them into HTTP.

Every failure on the request path is a :class:`ProxyError`. Each subclass fixes the HTTP
status and the machine-readable ``error`` code; the instance carries a sentence for humans
(``detail``) and, where known, the route name. Third-party exceptions (aiohttp, spiffe,
cryptography) are converted into these at the module that calls the library, never later.

    Exception
    ├── ConfigError                  config file invalid (all problems, each with its YAML path)
    └── ProxyError                   -> JSON error response to the app
        ├── BadRequest               400  malformed or unsupported request
        │   └── NotAProxyRequest     400  origin-form request on the proxy port
        ├── Forbidden                403  destination or scope not allowed
        │   ├── UnknownDestination   403
        │   └── NoScopeRule          403
        ├── IdentityUnavailable      503  no SVID from the Workload API
        ├── TokenUnavailable         503  AS unreachable / 5xx and no valid token cached
        ├── TokenRejected            502  AS answered 4xx, or an unsafe token response
        ├── UpstreamUnavailable      502  cannot connect / TLS failure to the upstream
        ├── UpstreamBusy             503  no connection slot to the upstream freed up in time
        └── UpstreamTimeout          504

No message here may contain a token, proof, key or SVID: details are written by our code from
values we choose, and AS error texts are sanitised (:func:`sanitize`) before they are kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

_UNSAFE = re.compile(r"[^\x20-\x7e]")
_JWT_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


def sanitize(text: object, limit: int = 200) -> str:
    """Make a peer-supplied string safe to show: printable ASCII, bounded, no JWT-shaped values."""
    cleaned = _UNSAFE.sub("?", str(text))[:limit]
    return _JWT_LIKE.sub("[redacted]", cleaned)


class ConfigError(Exception):
    """The configuration is invalid. ``problems`` lists every problem as ``path: message``."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class ProxyError(Exception):
    status = 500
    code = "internal_error"

    def __init__(
        self,
        detail: str,
        *,
        route: str | None = None,
        retry_after: int | None = None,
        upstream_error: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.route = route
        self.retry_after = retry_after
        self.upstream_error = upstream_error

    def body(self) -> dict[str, object]:
        doc: dict[str, object] = {"error": self.code, "detail": self.detail}
        if self.route is not None:
            doc["route"] = self.route
        if self.upstream_error is not None:
            doc["authorization_server_error"] = self.upstream_error
        return doc

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers

    def encode(self) -> bytes:
        return json.dumps(self.body()).encode()


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class NotAProxyRequest(BadRequest):
    code = "not_a_proxy_request"


class Forbidden(ProxyError):
    status = 403
    code = "forbidden"


class UnknownDestination(Forbidden):
    code = "destination_not_allowed"


class NoScopeRule(Forbidden):
    code = "no_scope_rule"


class IdentityUnavailable(ProxyError):
    status = 503
    code = "identity_unavailable"


class TokenUnavailable(ProxyError):
    status = 503
    code = "token_unavailable"


class TokenRejected(ProxyError):
    status = 502
    code = "token_request_rejected"


class UpstreamUnavailable(ProxyError):
    status = 502
    code = "upstream_unavailable"


class UpstreamBusy(ProxyError):
    """Every connection slot of the route stayed taken for the route's ``queue_timeout``:
    the request was never sent (safe to retry, after Retry-After)."""

    status = 503
    code = "upstream_busy"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"
