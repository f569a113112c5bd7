"""DEVELOPMENT ONLY: a strict OAuth 2.0 authorization server for the demo and the tests.

It really checks what a production AS checks, so the sidecar cannot pass by accident:

- client authentication: JWT-SVID client assertions (``jwt-spiffe`` and RFC 7523
  ``jwt-bearer``) verified against the SPIFFE trust bundle, with audience, expiry and subject;
  ``client_secret_basic`` / ``client_secret_post``; RFC 8705 ``tls_client_auth`` by URI SAN;
  public clients;
- grants: client_credentials, RFC 8693 token exchange and RFC 7523 JWT bearer, with the
  JWT-SVID as subject token / assertion;
- DPoP proofs (RFC 9449) with jti replay, iat window and optional server nonces;
- RFC 8707 resource indicators and scopes against an allow-list.

It issues RFC 9068 JWT access tokens, DPoP-bound by ``cnf.jkt``. Every request is recorded
(never the credentials) so tests can assert what the sidecar asked for.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import secrets
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.devstack.dpop_verify import ProofError, ProofVerifier

JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
GRANTS = ("client_credentials", TOKEN_EXCHANGE, JWT_BEARER_GRANT)


@dataclass
class TokenRequestRecord:
    """What one token request asked for and how it ended. No credential is kept."""

    grant_type: str
    client_id: str | None
    auth_method: str
    scope: tuple[str, ...]
    resources: tuple[str, ...]
    audiences: tuple[str, ...]
    dpop_jkt: str | None
    status: int = 0
    error: str | None = None
    params: dict[str, str] = field(default_factory=dict)  # non-secret form fields
    client_cert_sha256: str | None = None  # the TLS client certificate presented, if any
    at: float = field(default_factory=time.monotonic)  # when it arrived (AS load per interval)


class OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400, **headers: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.headers = headers


_SECRET_FIELDS = {"client_assertion", "client_secret", "subject_token", "actor_token", "assertion"}


class DevAuthServer:
    def __init__(
        self,
        *,
        trust_jwks: Callable[[], Mapping[str, Any]],
        ssl_context: ssl.SSLContext,
        host: str = "127.0.0.1",
        port: int = 0,
        token_ttl: int = 300,
        require_dpop: bool = True,
        require_nonce: bool = False,
        issue_bearer: bool = False,
        client_secrets: Mapping[str, str] | None = None,
        public_clients: Iterable[str] = (),
        allowed_scopes: Iterable[str] | None = None,
        allowed_resources: Iterable[str] | None = None,
        svid_audiences: Iterable[str] | None = None,
        trust_domain: str | None = None,
    ) -> None:
        self._trust_jwks = trust_jwks
        self._ssl = ssl_context
        self._host = host
        self._port = port
        self.token_ttl = token_ttl
        self.require_dpop = require_dpop
        self.issue_bearer = issue_bearer
        self.client_secrets = dict(client_secrets or {})
        self.public_clients = set(public_clients)
        self.allowed_scopes = set(allowed_scopes) if allowed_scopes is not None else None
        self.allowed_resources = set(allowed_resources) if allowed_resources is not None else None
        self._svid_audiences = set(svid_audiences) if svid_audiences is not None else None
        self.trust_domain = trust_domain
        self.proofs = ProofVerifier(require_nonce=require_nonce)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._kid = secrets.token_hex(8)
        self.token_requests: list[TokenRequestRecord] = []
        self.issued_tokens: list[str] = []
        self.proofs_seen: list[str] = []  # DPoP proofs received (the suite scans logs for them)
        self.metadata_requests: list[str] = []  # well-known paths asked for, in order
        self.rfc8414 = True  # False: serve only the OIDC discovery document, as some IdPs do
        self.metadata_issuer: str | None = None  # set: publish a wrong issuer (mix-up tests)
        # set: the issuer as clients reach it through a proxy in front (the chaos suite's fault
        # proxy); DPoP htu and JWT-SVID audiences are then checked against this address.
        self.public_issuer: str | None = None
        self._answered = asyncio.Condition()
        self._failures: list[tuple[int, str, str | None]] = []
        self._down = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> DevAuthServer:
        app = web.Application()
        app.router.add_get("/.well-known/oauth-authorization-server", self._metadata)
        app.router.add_get("/.well-known/openid-configuration", self._metadata)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def issuer(self) -> str:
        if self.public_issuer is not None:
            return self.public_issuer
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"https://{host}:{self.port}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key()))
        jwk.update(kid=self._kid, use="sig", alg="ES256")
        return {"keys": [jwk]}

    # -- test controls ------------------------------------------------------------------------
    def fail_next(
        self,
        status: int,
        error: str = "server_error",
        *,
        count: int = 1,
        retry_after: str | None = None,
    ) -> None:
        """Answer the next ``count`` token requests with this error."""
        self._failures.extend([(status, error, retry_after)] * count)

    def set_down(self, down: bool) -> None:
        """While down, every token request gets 503 (the IdP is having a bad day)."""
        self._down = down

    async def wait_for_requests(self, count: int, timeout: float = 10.0) -> None:
        """Until ``count`` token requests have been answered (or fail after ``timeout``)."""
        async with asyncio.timeout(timeout), self._answered:
            await self._answered.wait_for(
                lambda: (
                    len(self.token_requests) >= count
                    and all(r.status for r in self.token_requests[:count])
                )
            )

    # -- handlers -----------------------------------------------------------------------------
    async def _metadata(self, request: web.Request) -> web.Response:
        self.metadata_requests.append(request.path)
        if not self.rfc8414 and request.path.endswith("/oauth-authorization-server"):
            raise web.HTTPNotFound()
        return web.json_response(
            {
                "issuer": self.metadata_issuer or self.issuer,
                "token_endpoint": self.token_endpoint,
                "jwks_uri": f"{self.issuer}/jwks",
                "grant_types_supported": list(GRANTS),
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "private_key_jwt",
                    "tls_client_auth",
                    "none",
                ],
                "dpop_signing_alg_values_supported": ["ES256", "ES384", "RS256", "PS256"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.jwks())

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        multi = await request.post()
        record = TokenRequestRecord(
            grant_type=form.get("grant_type", ""),
            client_id=form.get("client_id"),
            auth_method="",
            scope=tuple(form.get("scope", "").split()),
            resources=tuple(str(v) for v in multi.getall("resource", [])),
            audiences=tuple(str(v) for v in multi.getall("audience", [])),
            dpop_jkt=None,
            params={k: v for k, v in form.items() if k not in _SECRET_FIELDS},
        )
        self.token_requests.append(record)
        try:
            body, headers = self._issue(request, form, record)
        except OAuthError as exc:
            record.status, record.error = exc.status, exc.error
            await self._notify()
            return web.json_response(
                {"error": exc.error, "error_description": exc.description},
                status=exc.status,
                headers={"Cache-Control": "no-store", **exc.headers},
            )
        record.status = 200
        await self._notify()
        return web.json_response(body, headers={"Cache-Control": "no-store", **headers})

    async def _notify(self) -> None:
        async with self._answered:
            self._answered.notify_all()

    def _issue(
        self, request: web.Request, form: dict[str, str], record: TokenRequestRecord
    ) -> tuple[dict[str, Any], dict[str, str]]:
        if self._down:
            raise OAuthError("temporarily_unavailable", "the dev AS is down", 503)
        if self._failures:
            status, error, retry_after = self._failures.pop(0)
            extra = {"Retry-After": retry_after} if retry_after else {}
            raise OAuthError(error, "failure injected by the test", status, **extra)
        record.client_cert_sha256 = _peer_fingerprint(request)
        client_id, record.auth_method = self._authenticate(request, form)
        record.client_id = client_id
        subject = self._grant(form, record, client_id)
        self._check_scope_and_target(record)
        jkt = self._dpop(request, record)
        return self._mint(subject, client_id, record, jkt)

    # -- client authentication ----------------------------------------------------------------
    def _authenticate(self, request: web.Request, form: dict[str, str]) -> tuple[str, str]:
        assertion_type = form.get("client_assertion_type")
        basic = request.headers.get("Authorization", "")
        methods = [
            bool(assertion_type),
            basic.lower().startswith("basic "),
            "client_secret" in form,
        ]
        if sum(methods) > 1:
            raise OAuthError("invalid_request", "more than one client authentication method", 400)
        if assertion_type in (JWT_SPIFFE, JWT_BEARER_ASSERTION):
            subject = self._verify_svid(form.get("client_assertion", ""), "client_assertion")
            if form.get("client_id") not in (None, subject):
                raise OAuthError("invalid_client", "client_id does not match the assertion", 401)
            return subject, "jwt_spiffe" if assertion_type == JWT_SPIFFE else "jwt_bearer"
        if assertion_type:
            raise OAuthError("invalid_client", "unsupported client_assertion_type", 401)
        if methods[1]:
            try:
                raw = base64.b64decode(basic[6:].strip(), validate=True).decode()
                client_id, _, secret = raw.partition(":")
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise OAuthError("invalid_client", "malformed Basic credentials", 401) from exc
            return self._check_secret(unquote(client_id), unquote(secret)), "client_secret_basic"
        if methods[2]:
            return (
                self._check_secret(form.get("client_id", ""), form["client_secret"]),
                "client_secret_post",
            )
        client_id = form.get("client_id", "")
        peer = _peer_uri_san(request)
        if peer is not None:
            if client_id and client_id != peer:
                raise OAuthError("invalid_client", "certificate does not match client_id", 401)
            return peer, "tls_client_auth"
        if client_id and client_id in self.public_clients:
            return client_id, "none"
        raise OAuthError("invalid_client", "client authentication failed", 401)

    def _check_secret(self, client_id: str, secret: str) -> str:
        expected = self.client_secrets.get(client_id)
        if expected is None or not secrets.compare_digest(expected, secret):
            raise OAuthError("invalid_client", "client authentication failed", 401)
        return client_id

    def _verify_svid(self, token: str, what: str) -> str:
        """Validate a JWT-SVID against the trust bundle: signature, aud, exp, SPIFFE ID sub."""
        try:
            header = jwt.get_unverified_header(token)
            keys = {k.get("kid"): k for k in self._trust_jwks().get("keys", [])}
            jwk = keys.get(header.get("kid"))
            if jwk is None:
                raise OAuthError("invalid_client", f"{what}: unknown signing key", 401)
            key = jwt.PyJWK(jwk, algorithm=header.get("alg", "ES256")).key
            audiences = self._svid_audiences or {self.issuer, self.token_endpoint}
            claims = jwt.decode(
                token,
                key,
                algorithms=["ES256", "ES384", "RS256", "PS256"],
                audience=list(audiences),
                options={"require": ["sub", "aud", "exp"]},
            )
        except jwt.PyJWTError as exc:
            raise OAuthError("invalid_client", f"{what} rejected: {exc}", 401) from exc
        subject = str(claims["sub"])
        if not subject.startswith("spiffe://"):
            raise OAuthError("invalid_client", f"{what}: sub is not a SPIFFE ID", 401)
        if self.trust_domain and urlsplit(subject).netloc != self.trust_domain:
            raise OAuthError("invalid_client", f"{what}: foreign trust domain", 401)
        return subject

    # -- grants -------------------------------------------------------------------------------
    def _grant(self, form: dict[str, str], record: TokenRequestRecord, client_id: str) -> str:
        grant = form.get("grant_type")
        if grant == "client_credentials":
            return client_id
        if grant == TOKEN_EXCHANGE:
            token = form.get("subject_token")
            if not token or not form.get("subject_token_type"):
                raise OAuthError("invalid_request", "subject_token and its type are required")
            requested = form.get("requested_token_type")
            if requested not in (None, ACCESS_TOKEN_TYPE):
                raise OAuthError("invalid_request", "unsupported requested_token_type")
            return self._verify_svid(token, "subject_token")
        if grant == JWT_BEARER_GRANT:
            return self._verify_svid(form.get("assertion", ""), "assertion")
        raise OAuthError("unsupported_grant_type", f"grant_type {grant!r} is not supported")

    def _check_scope_and_target(self, record: TokenRequestRecord) -> None:
        for resource in record.resources:
            parts = urlsplit(resource)
            if not parts.scheme or parts.fragment or "#" in resource:
                raise OAuthError("invalid_target", "resource must be an absolute URI")
            if self.allowed_resources is not None and resource not in self.allowed_resources:
                raise OAuthError("invalid_target", "resource not allowed for this client")
        if self.allowed_scopes is not None:
            unknown = set(record.scope) - self.allowed_scopes
            if unknown:
                raise OAuthError("invalid_scope", f"scope not allowed: {' '.join(sorted(unknown))}")

    def _dpop(self, request: web.Request, record: TokenRequestRecord) -> str | None:
        proofs = request.headers.getall("DPoP", [])
        if len(proofs) > 1:
            raise OAuthError("invalid_dpop_proof", "more than one DPoP header")
        self.proofs_seen.extend(proofs)
        if not proofs:
            if self.require_dpop:
                raise OAuthError("invalid_dpop_proof", "a DPoP proof is required")
            return None
        try:
            proof = self.proofs.verify(proofs[0], method="POST", url=self.token_endpoint)
        except ProofError as exc:
            headers = {"DPoP-Nonce": self.proofs.nonce} if exc.error == "use_dpop_nonce" else {}
            raise OAuthError(exc.error, exc.description, 400, **headers) from exc
        record.dpop_jkt = proof.jkt
        return proof.jkt

    def _mint(
        self, subject: str, client_id: str, record: TokenRequestRecord, jkt: str | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        now = int(time.time())
        audience: list[str] = [*record.resources, *record.audiences]
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience[0] if len(audience) == 1 else audience or self.issuer,
            "client_id": client_id,
            "iat": now,
            "exp": now + self.token_ttl,
            "jti": secrets.token_urlsafe(12),
        }
        if record.scope:
            claims["scope"] = " ".join(record.scope)
        bound = jkt is not None and not self.issue_bearer
        if bound:
            claims["cnf"] = {"jkt": jkt}
        token = jwt.encode(
            claims, self._key, algorithm="ES256", headers={"typ": "at+jwt", "kid": self._kid}
        )
        self.issued_tokens.append(token)
        body: dict[str, Any] = {
            "access_token": token,
            "token_type": "DPoP" if bound else "Bearer",
            "expires_in": self.token_ttl,
        }
        if record.scope:
            body["scope"] = " ".join(record.scope)
        if record.grant_type == TOKEN_EXCHANGE:
            body["issued_token_type"] = ACCESS_TOKEN_TYPE
        headers = {"DPoP-Nonce": self.proofs.nonce} if self.proofs.require_nonce else {}
        return body, headers


def _peer_fingerprint(request: web.Request) -> str | None:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return hashlib.sha256(der).hexdigest() if der else None


def _peer_uri_san(request: web.Request) -> str | None:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    return uris[0] if len(uris) == 1 else None
