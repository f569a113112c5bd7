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
values we choose. What a peer says is never shown as it said it: the app and ``/readyz`` get
only an OAuth ``error`` code from the registries (:func:`registered_error`), and the AS's free
text is logged only after :class:`Scrubber` has removed, by value, everything the sidecar sent.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Sequence
from urllib.parse import quote, quote_plus

_UNSAFE = re.compile(r"[^\x20-\x7e]")
_JWT_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
REDACTED = "[redacted]"

# The OAuth error codes a peer may name, from the registries (RFC 6749 §4.1.2.1, §5.2;
# RFC 6750 §3.1; RFC 8693 §2.2.2; RFC 8707 §2; RFC 9449 §5, §7.1, §8). Anything else an AS
# or resource server says is "unknown": a code outside the registry is free text.
OAUTH_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
        "unsupported_response_type",
        "server_error",
        "temporarily_unavailable",
        "invalid_token",
        "insufficient_scope",
        "invalid_target",
        "invalid_dpop_proof",
        "use_dpop_nonce",
    }
)


def registered_error(code: object) -> str:
    """The peer's ``error`` if it is a registered OAuth error code, else ``"unknown"``."""
    return code if isinstance(code, str) and code in OAUTH_ERRORS else "unknown"


def sanitize(text: object, limit: int = 200) -> str:
    """Make a peer-supplied string safe to show: printable ASCII, bounded, no JWT-shaped values."""
    cleaned = _UNSAFE.sub("?", str(text))[:limit]
    return _JWT_LIKE.sub(REDACTED, cleaned)


class Scrubber:
    """Removes, by value, what the sidecar sent from what a peer says back.

    Given the exact values sent (client secret, assertion, proof, Authorization header...),
    it removes each of them, every run of ``window`` or more characters of them (a JWT's
    signature segment, half a secret) and their url-encoded, base64 and JSON-escaped forms.
    A pattern (``eyJ...``) misses a secret that does not look like one; the value does not.
    """

    def __init__(self, sent: Iterable[str], *, window: int = 8) -> None:
        self._window = window
        self._sent = list(sent)
        self._whole: set[str] = set()  # values shorter than the window: matched whole
        self._grams: set[str] = set()
        self._built = False  # built on first use (~2 ms for a request's values): most
        # token requests succeed with nothing to scrub

    def __repr__(self) -> str:
        return f"Scrubber(<{len(self._sent)} values>)"

    def _build(self) -> None:
        window = self._window
        for value in self._sent:
            for form in _encodings(value):
                if len(form) < window:
                    self._whole.add(form)
                else:
                    self._grams.update(form[i : i + window] for i in range(len(form) - window + 1))
        self._built = True

    def scrub(self, text: str, limit: int = 200) -> str:
        """``text`` without anything sent, then made printable and bounded (``limit``)."""
        if not self._built:
            self._build()
        text = text[: limit * 4]  # bounded work: the grams scan is linear in this
        covered = bytearray(len(text))
        w = self._window
        for i in range(len(text) - w + 1):
            if text[i : i + w] in self._grams:
                covered[i : i + w] = b"\x01" * w
        for whole in self._whole:
            for match in re.finditer(re.escape(whole), text):
                covered[match.start() : match.end()] = b"\x01" * len(whole)
        out: list[str] = []
        for index, char in enumerate(text):
            if not covered[index]:
                out.append(char)
            elif index == 0 or not covered[index - 1]:
                out.append(REDACTED)
        return sanitize("".join(out), limit)


def _encodings(value: str) -> set[str]:
    if not value:
        return set()
    raw = value.encode()
    b64 = base64.b64encode(raw).decode()
    b64url = base64.urlsafe_b64encode(raw).decode()
    forms = {
        value,
        quote(value, safe=""),
        quote_plus(value, safe=""),
        json.dumps(value)[1:-1],
        b64,
        b64.rstrip("="),
        b64url,
        b64url.rstrip("="),
    }
    return {f for f in forms if f}


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
        peer_text: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.route = route
        self.retry_after = retry_after
        # A registered OAuth error code (registered_error), shown to the app and /readyz.
        self.upstream_error = upstream_error
        # What the peer said in free text, already scrubbed by value (Scrubber): for the log
        # line only, never for a body, a header, /readyz or a metric.
        self.peer_text = peer_text

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


class Misdirected(ProxyError):
    """RFC 9110 §15.5.20: an intercepted request names another host than its CONNECT."""

    status = 421
    code = "misdirected_request"


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


# What the audit line and ``sidecar_request_errors_total`` name when the sidecar itself ended
# a request without a ProxyError: the app left first (nginx's 499), or a bug (500).
APP_GONE = "app_gone"


def error_codes() -> frozenset[str]:
    """Every ``error`` code the sidecar can answer the app with (a bounded vocabulary)."""
    codes = {APP_GONE}
    pending: list[type[ProxyError]] = [ProxyError]
    while pending:
        kind = pending.pop()
        codes.add(kind.code)
        pending.extend(kind.__subclasses__())
    return frozenset(codes)
