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
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlencode, urlsplit

import jwt

from sidecar.config import AuthorizationServer
from sidecar.credentials.dpop import DpopKey, NonceStore, access_token_hash
from sidecar.credentials.identity import JwtSvid, WorkloadIdentity
from sidecar.errors import ProxyError, TokenRejected, TokenUnavailable, sanitize
from sidecar.ops.audit import token_reference
from sidecar.secret import Secret

log = logging.getLogger("sidecar.token")
audit = logging.getLogger("sidecar.audit")

JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
MAX_RESPONSE_BYTES = 64 * 1024
METADATA_TTL = 3600.0
DEFAULT_LIFETIME = 300.0  # when the AS says neither expires_in nor exp


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
    x509: str | None = None  # certificate fingerprint, for mTLS-bound tokens


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
    if server.client_auth == "jwt_svid":
        form["client_assertion_type"] = JWT_SPIFFE
        form["client_assertion"] = assertion
    elif server.client_auth == "jwt_bearer":
        form["client_assertion_type"] = JWT_BEARER_ASSERTION
        form["client_assertion"] = assertion
    elif server.client_auth in ("none", "mtls") or (
        server.client_id and server.client_auth != "client_secret"
    ):
        form["client_id"] = key.client_id  # RFC 8705 §2: mTLS clients send their client_id
    if key.resource:
        form["resource"] = key.resource
    if key.audience:
        form["audience"] = key.audience
    if key.scopes:
        form["scope"] = " ".join(key.scopes)
    return form


def basic_credentials(client_id: str, secret: str) -> str:
    """RFC 6749 §2.3.1: both parts form-urlencoded, then Basic."""
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def needs_svid(server: AuthorizationServer) -> bool:
    return server.client_auth in ("jwt_svid", "jwt_bearer") or server.grant != "client_credentials"


def parse_token_response(
    status: int, body: bytes, *, dpop: bool, route: str, now: float
) -> AccessToken:
    """Turn the AS's answer into a token, or the error the app will see (RFC 6749 §5.1-5.2)."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if status != 200:
        error = sanitize(doc.get("error", "")) if isinstance(doc, dict) else ""
        desc = sanitize(doc.get("error_description", "")) if isinstance(doc, dict) else ""
        summary = f"{error}: {desc}" if desc else error or f"HTTP {status}"
        if status >= 500 or status == 429:
            raise TokenUnavailable(
                f"the authorization server is unavailable (HTTP {status})",
                route=route,
                upstream_error=summary,
            )
        raise TokenRejected(
            f"the authorization server refused the token request ({error or status})",
            route=route,
            upstream_error=summary,
        )
    if not isinstance(doc, dict) or not isinstance(doc.get("access_token"), str):
        raise TokenRejected("the authorization server's answer has no access_token", route=route)
    token_type = str(doc.get("token_type", "")).lower()
    if token_type not in ("dpop", "bearer"):
        raise TokenRejected(f"unsupported token_type {sanitize(token_type)!r}", route=route)
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
    lifetime = _lifetime(doc, claims)
    scope = doc.get("scope")
    return AccessToken(
        value=Secret(value),
        token_type="DPoP" if token_type == "dpop" else "Bearer",
        issued_at=now,
        expires_at=now + lifetime,
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


def _lifetime(doc: Mapping[str, Any], claims: Mapping[str, Any]) -> float:
    expires_in = doc.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        return float(expires_in)
    if isinstance(claims.get("exp"), int | float):
        return max(0.0, float(claims["exp"]) - time.time())
    return DEFAULT_LIFETIME


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
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        self._observe = observe or (lambda server, outcome: None)
        self.issued_by: set[str] = set()  # servers that issued at least one token
        self.last_error: dict[str, str] = {}  # server -> why its last request failed
        self._transport = transport
        self._identity = identity
        self._dpop_key = dpop_key
        self._nonces = nonces
        self._ssl_for = ssl_for
        self._clock = clock
        self._metadata: dict[str, _Metadata] = {}
        self._secrets: dict[Path, tuple[tuple[int, int, int], Secret]] = {}
        self._mtls: dict[tuple[Path | None, str], ssl.SSLContext] = {}

    async def close(self) -> None:
        await self._transport.close()

    async def fetch(self, server: AuthorizationServer, key: TokenKey, route: str) -> AccessToken:
        """One token from ``server``; the outcome is counted and remembered for readiness."""
        try:
            token = await self._fetch(server, key, route)
        except ProxyError as exc:
            outcome = "unavailable" if exc.status in (503, 504) else "rejected"
            self.last_error[server.name] = exc.upstream_error or exc.detail
            self._observe(server.name, outcome)
            raise
        self.issued_by.add(server.name)
        self.last_error.pop(server.name, None)
        self._observe(server.name, "ok")
        return token

    async def _fetch(self, server: AuthorizationServer, key: TokenKey, route: str) -> AccessToken:
        endpoint = await self.token_endpoint(server, route)
        svid = (
            await self._identity.jwt_svid(server.jwt_svid_audience) if needs_svid(server) else None
        )
        # RFC 6749 §4.4.2 / Appendix B: application/x-www-form-urlencoded, repeated parameters
        # (RFC 8693 resource/audience) as repeated pairs.
        body = urlencode(token_form(server, key, svid), doseq=True).encode("ascii")
        dpop = key.jkt is not None
        origin = _origin(endpoint)
        base_headers = [
            ("Accept", "application/json"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ]
        if server.client_auth == "client_secret":
            secret = await self._client_secret(server, route)
            base_headers.append(
                ("Authorization", basic_credentials(key.client_id, secret.reveal()))
            )
        ssl_context = await self._ssl(server)
        for attempt in (1, 2):
            headers = list(base_headers)
            if dpop:
                proof = self._dpop_key.proof("POST", endpoint, nonce=self._nonces.get(origin))
                headers.append(("DPoP", proof))
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
        token = parse_token_response(status, answer, dpop=dpop, route=route, now=self._clock())
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

    def forget(self, server: str) -> None:
        """Drop what was learnt about a server (metadata, readiness): its config changed."""
        self._metadata.pop(server, None)
        self.issued_by.discard(server)
        self.last_error.pop(server, None)

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
