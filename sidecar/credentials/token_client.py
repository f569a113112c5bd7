"""Token client: ask an authorization server for an access token.

The protocol is pure functions (:func:`token_form`, :func:`parse_token_response`,
:func:`discovery_urls`); :class:`TokenClient` is the I/O edge, on the project's own HTTP/1.1
client (a :class:`Transport`: the runtime passes :mod:`sidecar.proxy.origin_client`'s). Its
errors are converted here into :class:`TokenUnavailable` (503, retry later) or
:class:`TokenRejected` (502, the AS said no or said something unsafe).

Grants: client_credentials (RFC 6749 §4.4), token exchange (RFC 8693) with the JWT-SVID as
subject token, JWT bearer (RFC 7523 §2.1) with the JWT-SVID as assertion. Client auth:
``jwt_svid`` (draft-ietf-oauth-spiffe-client-auth), ``jwt_bearer`` (RFC 7523 §2.2), ``mtls``
(RFC 8705 with the X.509-SVID), ``client_secret`` (HTTP Basic, the secret read from a file and
re-read when it changes), ``none``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import quote, urlencode, urlsplit

import jwt

from sidecar.config import AuthorizationServer
from sidecar.credentials.dpop import DpopKey, NonceStore, access_token_hash
from sidecar.credentials.identity import JwtSvid, WorkloadIdentity, X509Material
from sidecar.errors import ProxyError, Scrubber, TokenRejected, TokenUnavailable, registered_error
from sidecar.ops.audit import token_reference
from sidecar.secret import Secret

if TYPE_CHECKING:
    from sidecar.ops.tracing import Tracing

log = logging.getLogger("sidecar.token")
audit = logging.getLogger("sidecar.audit")

JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
MAX_RESPONSE_BYTES = 64 * 1024
METADATA_TTL = 3600.0
# RFC 6749 §5.1: expires_in is RECOMMENDED. With neither it nor a readable exp, assume a short
# life (a new token every ~4 minutes) rather than refuse a legal answer.
DEFAULT_LIFETIME = 300.0
# No access token lives longer than a year: an expires_in beyond is a broken or hostile AS.
MAX_LIFETIME = 365 * 86400.0


@dataclass(frozen=True)
class TokenKey:
    """Everything that shapes a token. Tokens are never shared between different keys."""

    server: str
    client_id: str
    grant: str
    resource: str | None
    audience: str | None
    scopes: tuple[str, ...]
    jkt: str | None  # DPoP key thumbprint; None for Bearer routes


@dataclass(frozen=True)
class AccessToken:
    value: Secret
    token_type: Literal["DPoP", "Bearer"]
    issued_at: float  # monotonic
    expires_at: float  # monotonic
    scope: tuple[str, ...]
    claims: Mapping[str, Any] = field(default_factory=dict)  # non-secret, for audit and demo

    @cached_property
    def ath(self) -> str:
        """RFC 9449 ``ath`` for this token, computed once (a hash: not a secret)."""
        return access_token_hash(self.value.reveal())

    @cached_property
    def reference(self) -> dict[str, Any]:
        """Who this token is, for audit lines (claims or a fingerprint; never the token)."""
        return token_reference(self.claims, self.value.reveal())

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at

    @cached_property
    def usable_until(self) -> float:
        # Stop a little before expiry (servers may allow no leeway), but not seconds early.
        return self.expires_at - min(2.0, self.lifetime * 0.05)

    def usable(self, now: float) -> bool:
        return now < self.usable_until


# -- pure protocol -----------------------------------------------------------------------------


def discovery_urls(issuer: str) -> tuple[str, str]:
    """RFC 8414 §3.1 (well-known inserted before the issuer path), then the OIDC location."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    origin = f"{parts.scheme}://{parts.netloc}"
    return (
        f"{origin}/.well-known/oauth-authorization-server{path}",
        f"{issuer.rstrip('/')}/.well-known/openid-configuration",
    )


def token_form(server: AuthorizationServer, key: TokenKey, svid: JwtSvid | None) -> dict[str, Any]:
    """The form fields of a token request (values may be lists: repeated parameters)."""
    form: dict[str, Any] = {}
    assertion = svid.token.reveal() if svid else None
    if server.grant == "client_credentials":
        form["grant_type"] = "client_credentials"
    elif server.grant == "token_exchange":
        form["grant_type"] = TOKEN_EXCHANGE
        form["subject_token"] = assertion
        form["subject_token_type"] = server.subject_token_type
        if server.requested_token_type:  # some servers reject a type they do not expect
            form["requested_token_type"] = server.requested_token_type
    elif server.grant == "jwt_bearer":
        form["grant_type"] = JWT_BEARER_GRANT
        form["assertion"] = assertion
    if server.client_auth in ("jwt_svid", "jwt_bearer"):
        form["client_assertion_type"] = (
            JWT_SPIFFE if server.client_auth == "jwt_svid" else JWT_BEARER_ASSERTION
        )
        form["client_assertion"] = assertion
        if server.client_id:
            # RFC 7521 §4.2 makes client_id optional beside an assertion, but Entra ID requires
            # it; the assertion's sub (the SPIFFE ID) names the client otherwise.
            form["client_id"] = key.client_id
    elif (
        server.client_auth == "mtls"
        # JSON token APIs (AI vendors) name the client in their own fields: a client_id is
        # sent only when configured.
        or (server.client_auth == "none" and server.request_encoding == "form")
        or (server.client_id and server.client_auth != "client_secret")
    ):
        form["client_id"] = key.client_id  # RFC 8705 §2: mTLS clients send their client_id
    if key.resource:
        form["resource"] = key.resource
    if key.audience:
        form["audience"] = key.audience
    if key.scopes:
        form["scope"] = " ".join(key.scopes)
    form.update(server.extra_fields)  # vendor fields (config refuses the standard names)
    return form


def encode_form(form: Mapping[str, Any], encoding: str) -> tuple[bytes, str]:
    """The token request's body and Content-Type: RFC 6749 §4.4.2 / Appendix B form encoding
    (repeated parameters, RFC 8693 resource/audience, as repeated pairs), or a JSON object
    for the token APIs that document one (``request_encoding: json``)."""
    if encoding == "json":
        return json.dumps(dict(form)).encode(), "application/json"
    return urlencode(form, doseq=True).encode("ascii"), "application/x-www-form-urlencoded"


def basic_credentials(client_id: str, secret: str) -> str:
    """RFC 6749 §2.3.1: both parts form-urlencoded, then Basic."""
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def needs_svid(server: AuthorizationServer) -> bool:
    return server.client_auth in ("jwt_svid", "jwt_bearer") or server.grant != "client_credentials"


def parse_token_response(
    status: int,
    body: bytes,
    *,
    dpop: bool,
    route: str,
    now: float,
    sent_at: float | None = None,
    wall: float | None = None,
    scrub: Scrubber | None = None,
) -> AccessToken:
    """Turn the AS's answer into a token, or the error the app will see (RFC 6749 §5.1-5.2).

    ``now`` is when the answer arrived and ``sent_at`` when the request was sent (monotonic):
    the token's life is counted from ``sent_at``, the earliest instant the AS may have started
    it. ``wall`` is the epoch time now, to read a JWT's ``exp``. ``scrub`` removes what was sent
    from the AS's free text, which only ever reaches a log line (``peer_text``).
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if status != 200:
        raise _refusal(status, doc, route, scrub)
    if not isinstance(doc, dict) or not isinstance(doc.get("access_token"), str):
        raise TokenRejected("the authorization server's answer has no access_token", route=route)
    token_type = str(doc.get("token_type", "")).lower()
    if token_type not in ("dpop", "bearer"):
        # Not echoed: the AS's text is never shown, whatever it holds.
        raise TokenRejected(
            "the authorization server answered an unsupported token_type", route=route
        )
    if dpop and token_type != "dpop":
        # RFC 9449 §5: a Bearer answer means the AS ignored our proof. Fail closed.
        raise TokenRejected(
            "the authorization server issued a Bearer token for a DPoP route; refusing it "
            "(set token_type: bearer on the route only if Bearer is really intended)",
            route=route,
        )
    value = doc["access_token"]
    if not _HEADER_SAFE.fullmatch(value):
        # It goes into an Authorization header on every request: visible ASCII only
        # (RFC 6750 §2.1 allows less), so no token can split or end a header.
        raise TokenRejected(
            "the authorization server's access_token is empty or has characters an HTTP "
            "header cannot carry (spaces, line breaks, non-ASCII); refusing it",
            route=route,
        )
    claims = _unverified_claims(value)
    if scrub is not None:  # they reach audit lines: what we sent must not come back in them
        claims = _scrubbed(claims, scrub)
    start = now if sent_at is None else min(sent_at, now)
    lifetime = _lifetime(
        doc, claims, route=route, wall=time.time() if wall is None else wall, waited=now - start
    )
    scope = doc.get("scope")
    return AccessToken(
        value=Secret(value),
        token_type="DPoP" if token_type == "dpop" else "Bearer",
        issued_at=start,
        expires_at=start + lifetime,
        scope=tuple(sorted(scope.split())) if isinstance(scope, str) else (),
        claims=claims,
    )


_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_SAFE_CLAIMS = ("iss", "sub", "aud", "client_id", "scope", "jti", "iat", "exp", "cnf")


def _unverified_claims(token: str) -> dict[str, Any]:
    """Claims for audit and display. The AS is trusted over TLS; the RS verifies the token."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return {k: claims[k] for k in _SAFE_CLAIMS if k in claims}


def _scrubbed(claims: Mapping[str, Any], scrub: Scrubber) -> dict[str, Any]:
    """String claims (and lists of them) with anything the sidecar sent removed by value."""
    out: dict[str, Any] = {}
    for name, value in claims.items():
        if isinstance(value, str):
            value = scrub.scrub(value, limit=512)
        elif isinstance(value, list):
            value = [scrub.scrub(v, limit=512) if isinstance(v, str) else v for v in value]
        out[name] = value
    return out


def _refusal(status: int, doc: object, route: str, scrub: Scrubber | None) -> ProxyError:
    """The app's error for a non-200 answer: the registered ``error`` code only (else
    ``unknown``); ``error_description`` is kept for the log, scrubbed by value, or dropped."""
    fields: Mapping[str, Any] = doc if isinstance(doc, dict) else {}
    code = registered_error(fields.get("error"))
    description = fields.get("error_description")
    peer_text = scrub.scrub(description) if scrub and isinstance(description, str) else None
    if status >= 500 or status == 429:
        return TokenUnavailable(
            f"the authorization server is unavailable (HTTP {status})",
            route=route,
            upstream_error=code,
            peer_text=peer_text,
        )
    return TokenRejected(
        f"the authorization server refused the token request ({code}, HTTP {status})",
        route=route,
        upstream_error=code,
        peer_text=peer_text,
    )


def _seconds(value: object) -> float | None:
    """A JSON number usable as seconds (RFC 6749 §5.1: numbers are JSON numbers), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return seconds if math.isfinite(seconds) else None


def _lifetime(
    doc: Mapping[str, Any],
    claims: Mapping[str, Any],
    *,
    route: str,
    wall: float,
    waited: float = 0.0,
) -> float:
    """Seconds from the request's sending to the token's expiry: the earlier of ``expires_in``
    and the JWT's ``exp``. A present but unusable value (not a number, NaN, <= 0, beyond
    MAX_LIFETIME) is refused, never replaced by a default; with neither, DEFAULT_LIFETIME."""
    candidates: list[float] = []
    if "expires_in" in doc:
        expires_in = _seconds(doc["expires_in"])
        if expires_in is None or not 0 < expires_in <= MAX_LIFETIME:
            raise TokenRejected(
                "the authorization server's expires_in is not a positive number of seconds "
                f"up to {MAX_LIFETIME:.0f} (RFC 6749 §5.1); refusing the token",
                route=route,
            )
        candidates.append(expires_in)
    if "exp" in claims:
        exp = _seconds(claims["exp"])
        if exp is None or exp <= wall:
            raise TokenRejected(
                "the access token's exp is unreadable or already past (is this host's clock "
                "right?); refusing the token",
                route=route,
            )
        candidates.append(exp - wall + waited)  # exp, counted from the request's sending
    lifetime = min(candidates, default=DEFAULT_LIFETIME)
    if lifetime > MAX_LIFETIME:
        raise TokenRejected(
            f"the access token's exp is more than {MAX_LIFETIME:.0f} s away; refusing the token",
            route=route,
        )
    return lifetime


@dataclass(frozen=True)
class FetchOutcome:
    """How a route's last token request ended: ``ok``, or the error code (never AS text)."""

    ok: bool
    reason: str
    ever_ok: bool  # some token request for this route succeeded (since its config was applied)


_SENT_FIELDS = ("client_assertion", "subject_token", "assertion", "actor_token")


def _sent_values(
    form: Mapping[str, Any], headers: Mapping[str, str], secret: str | None
) -> list[str]:
    """What a token request carries that must never come back out (errors.Scrubber)."""
    sent = [v for k in _SENT_FIELDS if isinstance(v := form.get(k), str)]
    if "Authorization" in headers:
        auth = headers["Authorization"]
        param = auth.partition(" ")[2]
        sent += [auth, param]
        with contextlib.suppress(ValueError):  # Basic: what the base64 carries is sent too
            sent.append(base64.b64decode(param, validate=True).decode())
    if secret:
        sent += [secret, quote(secret, safe="")]  # RFC 6749 §2.3.1 form-encodes it for Basic
    return sent


# -- I/O edge ----------------------------------------------------------------------------------


@dataclass
class _Metadata:
    token_endpoint: str
    fetched_at: float


class Transport(Protocol):
    """How the token client speaks HTTP: one request, one small answer. The runtime passes the
    origin client's :class:`~sidecar.proxy.origin_client.UrlClient` (the product has one HTTP
    stack, and credentials do not import the proxy room); failures are ``TimeoutError`` or
    ``OSError`` (``ConnectionError``), with a message that is safe to show."""

    async def exchange(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        context: ssl.SSLContext,
        *,
        timeout: float,
        limit: int,
    ) -> tuple[int, bytes, str | None]:
        """(status, at most ``limit`` bytes of the body, DPoP-Nonce); redirects not followed;
        connections kept alive per (origin, TLS context)."""
        ...

    def drop(self, context: ssl.SSLContext) -> None:
        """Close the idle connections made with ``context`` (a superseded certificate)."""
        ...

    async def close(self) -> None: ...


Exchange = Callable[["TokenClient", AuthorizationServer, "TokenKey", str], Awaitable["AccessToken"]]
"""How a server of another ``kind`` than ``oauth`` issues credentials (``aws_sts``: see
:mod:`sidecar.credentials.aws_sts`), over the client's transport (:meth:`TokenClient.post`)."""


class TokenClient:
    """The I/O edge: discovery and token requests through a :class:`Transport`."""

    def __init__(
        self,
        transport: Transport,
        identity: WorkloadIdentity,
        dpop_key: DpopKey,
        nonces: NonceStore,
        *,
        ssl_for: Callable[[AuthorizationServer], ssl.SSLContext],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        observe: Callable[[str, str], None] | None = None,
        exchanges: Mapping[str, Exchange] | None = None,
    ) -> None:
        self._exchanges = dict(exchanges or {})
        self.identity = identity
        self._observe = observe or (lambda server, outcome: None)
        self._wall = wall  # epoch seconds, to read a JWT's exp
        self.issued_by: set[str] = set()  # servers that issued at least one token
        self.last_error: dict[str, str] = {}  # server -> why its last request failed
        self._transport = transport
        # route -> how its last token request ended, for readiness (ops/readiness.py)
        self.outcomes: dict[str, FetchOutcome] = {}
        self._identity = identity
        self._dpop_key = dpop_key
        self._nonces = nonces
        self._ssl_for = ssl_for
        self._clock = clock
        self._metadata: dict[str, _Metadata] = {}
        self._secrets: dict[Path, tuple[tuple[int, int, int], Secret]] = {}
        self._mtls: dict[tuple[Path | None, str], ssl.SSLContext] = {}
        self._tracing: Tracing | None = None
        identity.on_x509_rotation(self._x509_rotated)

    def _x509_rotated(self, svid: X509Material) -> None:
        """A new X.509-SVID: connections presenting the old one close now. Tokens are not
        fetched again on a rotation (they are not bound to the certificate), so this cannot
        wait for the next token request, which builds the new context."""
        for cache_key, context in list(self._mtls.items()):
            if cache_key[1] != svid.fingerprint:
                del self._mtls[cache_key]
                self._transport.drop(context)

    async def close(self) -> None:
        await self._transport.close()

    def now(self) -> float:
        """The client's monotonic clock (issued_at / expires_at of what it returns)."""
        return self._clock()

    def trace_with(self, tracing: Tracing) -> None:
        """Traces on: each token request is a span. (Off, ``fetch`` is the plain method.)"""
        self._tracing = tracing
        self.fetch = self._fetch_traced  # type: ignore[method-assign]

    async def _fetch_traced(
        self, server: AuthorizationServer, key: TokenKey, route: str
    ) -> AccessToken:
        assert self._tracing is not None
        with self._tracing.token_request(server):
            return await TokenClient.fetch(self, server, key, route)

    async def fetch(self, server: AuthorizationServer, key: TokenKey, route: str) -> AccessToken:
        """One token from ``server``; the outcome is counted and remembered for readiness."""
        exchange = self._exchanges.get(server.kind)
        try:
            if exchange is not None:
                token = await exchange(self, server, key, route)
            else:
                token = await self._fetch(server, key, route)
        except ProxyError as exc:
            outcome = "unavailable" if exc.status in (503, 504) else "rejected"
            # Codes and our own sentences only: never the AS's free text (errors.py).
            why = exc.upstream_error or exc.code
            self.last_error[server.name] = why
            previous = self.outcomes.get(route)
            self.outcomes[route] = FetchOutcome(False, why, previous.ever_ok if previous else False)
            self._observe(server.name, outcome)
            if exc.peer_text:
                log.info(
                    "authorization server error",
                    extra={
                        "authorization_server": server.name,
                        "route": route,
                        "error": why,
                        "description": exc.peer_text,  # scrubbed by value, 200 chars at most
                    },
                )
            raise
        self.issued_by.add(server.name)
        self.last_error.pop(server.name, None)
        self.outcomes[route] = FetchOutcome(True, "ok", True)
        self._observe(server.name, "ok")
        return token

    async def _fetch(self, server: AuthorizationServer, key: TokenKey, route: str) -> AccessToken:
        endpoint = await self.token_endpoint(server, route)
        svid = (
            await self._identity.jwt_svid(server.jwt_svid_audience) if needs_svid(server) else None
        )
        form = token_form(server, key, svid)
        body, content_type = encode_form(form, server.request_encoding)
        dpop = key.jkt is not None
        origin = _origin(endpoint)
        base_headers = [("Accept", "application/json"), ("Content-Type", content_type)]
        secret: Secret | None = None
        if server.client_auth == "client_secret":
            secret = await self._client_secret(server, route)
            base_headers.append(
                ("Authorization", basic_credentials(key.client_id, secret.reveal()))
            )
        ssl_context = await self._ssl(server)
        sent = _sent_values(form, dict(base_headers), secret.reveal() if secret else None)
        for attempt in (1, 2):
            headers = list(base_headers)
            if dpop:
                proof = self._dpop_key.proof("POST", endpoint, nonce=self._nonces.get(origin))
                headers.append(("DPoP", proof))
                sent.append(proof)
            sent_at = self._clock()  # the token's life is counted from here (not the answer)
            status, answer, nonce = await self._post(
                server, endpoint, body, headers, route, ssl_context
            )
            self._nonces.update(origin, nonce)
            # RFC 9449 §8: the AS wants a nonce; retry once with a fresh proof carrying it.
            if (
                attempt == 1
                and dpop
                and status == 400
                and nonce
                and _error_code(answer) == "use_dpop_nonce"
            ):
                self._observe(server.name, "nonce_retry")
                continue
            break
        token = parse_token_response(
            status,
            answer,
            dpop=dpop,
            route=route,
            now=self._clock(),
            sent_at=sent_at,
            wall=self._wall(),
            scrub=Scrubber(sent),
        )
        audit.info(
            "token issued",
            extra={
                "event": "token_issued",
                "client_id": key.client_id,
                "route": route,
                "authorization_server": server.name,
                "scope": " ".join(key.scopes),
                "token_type": token.token_type,
                "expires_in": round(token.lifetime),
                "jti": token.claims.get("jti"),
                "sub": token.claims.get("sub"),
            },
        )
        return token

    async def post(
        self,
        server: AuthorizationServer,
        url: str,
        body: bytes,
        headers: list[tuple[str, str]],
        route: str,
    ) -> tuple[int, bytes]:
        """One POST to ``server`` (its TLS context, timeout and answer cap): for exchanges."""
        status, answer, _ = await self._post(
            server, url, body, headers, route, await self._ssl(server)
        )
        return status, answer

    async def _post(
        self,
        server: AuthorizationServer,
        url: str,
        body: bytes,
        headers: list[tuple[str, str]],
        route: str,
        ssl_context: ssl.SSLContext,
    ) -> tuple[int, bytes, str | None]:
        try:
            return await self._transport.exchange(
                "POST",
                url,
                headers,
                body,
                ssl_context,
                timeout=server.timeout,
                limit=MAX_RESPONSE_BYTES,
            )
        except (TimeoutError, OSError) as exc:
            raise TokenUnavailable(
                f"cannot reach the authorization server {server.name!r} ({exc})",
                route=route,
                upstream_error=type(exc).__name__,
            ) from exc

    def forget(self, server: str, routes: Iterable[str] = ()) -> None:
        """Drop what was learnt about a server (metadata, readiness): its config changed."""
        self._metadata.pop(server, None)
        self.issued_by.discard(server)
        self.last_error.pop(server, None)
        for route in routes:
            self.outcomes.pop(route, None)

    async def _ssl(self, server: AuthorizationServer) -> ssl.SSLContext:
        """The AS's TLS context; for ``mtls``, one that presents the current X.509-SVID.

        A new SVID means a new context, and the pool is keyed by context: no pooled
        connection presenting the old certificate is reused, and the idle ones are closed.
        """
        if server.client_auth != "mtls":
            return self._ssl_for(server)
        svid = await self._identity.x509_svid()
        cache_key = (server.ca_file, svid.fingerprint)
        context = self._mtls.get(cache_key)
        if context is None:
            context = await asyncio.to_thread(svid.client_context, server.ca_file)
            for old_key, old in list(self._mtls.items()):
                if old_key[1] != svid.fingerprint:
                    del self._mtls[old_key]
                    self._transport.drop(old)
            self._mtls[cache_key] = context
        return context

    async def _client_secret(self, server: AuthorizationServer, route: str) -> Secret:
        """Read the secret file; re-read whenever it changes (a rotated Kubernetes Secret)."""
        path = server.client_secret_file
        assert path is not None  # validated: client_secret needs client_secret_file
        try:
            stat = await asyncio.to_thread(path.stat)
            version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            cached = self._secrets.get(path)
            if cached is not None and cached[0] == version:
                return cached[1]
            text = (await asyncio.to_thread(path.read_text, encoding="utf-8")).strip()
        except OSError as exc:
            raise TokenUnavailable(
                f"cannot read the client secret file of authorization server {server.name!r} "
                f"({exc.strerror})",
                route=route,
            ) from exc
        if not text:
            raise TokenUnavailable(
                f"the client secret file of authorization server {server.name!r} is empty",
                route=route,
            )
        secret = Secret(text)
        self._secrets[path] = (version, secret)
        return secret

    async def token_endpoint(self, server: AuthorizationServer, route: str) -> str:
        if server.token_endpoint:
            return server.token_endpoint
        assert server.issuer is not None
        cached = self._metadata.get(server.name)
        if cached and self._clock() - cached.fetched_at < METADATA_TTL:
            return cached.token_endpoint
        last: ProxyError | None = None
        for url in discovery_urls(server.issuer):
            try:
                endpoint = await self._discover(server, url, route)
            except TokenRejected as exc:
                last = exc
                continue
            self._metadata[server.name] = _Metadata(endpoint, self._clock())
            return endpoint
        assert last is not None
        raise last

    async def _discover(self, server: AuthorizationServer, url: str, route: str) -> str:
        try:
            status, body, _ = await self._transport.exchange(
                "GET",
                url,
                [("Accept", "application/json")],
                None,
                self._ssl_for(server),
                timeout=server.timeout,
                limit=MAX_RESPONSE_BYTES,
            )
        except (TimeoutError, OSError) as exc:
            raise TokenUnavailable(
                f"cannot reach the authorization server {server.name!r} for discovery ({exc})",
                route=route,
                upstream_error=type(exc).__name__,
            ) from exc
        if status >= 500:
            raise TokenUnavailable(f"discovery failed with HTTP {status}", route=route)
        try:
            doc = json.loads(body) if status == 200 else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise TokenRejected(f"no authorization server metadata at {url}", route=route)
        # RFC 8414 §3.3: the issuer in the metadata must be the one we asked about.
        if doc.get("issuer") != server.issuer:
            raise TokenRejected(
                f"the metadata at {url} names a different issuer; refusing it (RFC 8414 §3.3)",
                route=route,
            )
        endpoint = doc.get("token_endpoint")
        if not isinstance(endpoint, str) or urlsplit(endpoint).scheme != "https":
            raise TokenRejected("the metadata has no https token_endpoint", route=route)
        return endpoint


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _error_code(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc.get("error") if isinstance(doc, dict) else None
