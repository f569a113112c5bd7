"""DEVELOPMENT ONLY: a strict "SaaS" resource server for the demo and the tests.

Every request must carry a JWT access token (RFC 9068) signed by the dev AS, for this API's
audience, unexpired, with the scope the method and path need, and - unless the token is an
accepted Bearer token - a DPoP proof (RFC 9449 §7) whose key matches ``cnf.jkt`` and whose
``htm``, ``htu`` and ``ath`` match this very request. Optional server nonces (401
``use_dpop_nonce``).

What it saw is recorded per request (headers, body hash, verified claims) so tests assert on
what really arrived. Special paths: ``/download/<n>`` streams n bytes, ``/headers`` echoes
the request headers, ``/status/<code>`` answers that status, ``/echo`` returns the body,
``/hang`` never answers (until the server stops), ``/wait`` answers once ``release`` is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web

from sidecar.devstack.dpop_verify import ProofError, ProofVerifier

MAX_DOWNLOAD = 512 * 1024 * 1024
_CHUNK = b"\x5a" * 65536


@dataclass
class SeenRequest:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_sha256: str
    body_len: int
    token_claims: dict[str, Any] | None
    proof_claims: dict[str, Any] | None
    status: int
    error: str | None = None


class _Denied(Exception):
    def __init__(self, status: int, error: str, description: str, nonce: str | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.nonce = nonce


class DevSaasApi:
    def __init__(
        self,
        *,
        issuer: str,
        as_jwks: Callable[[], Mapping[str, Any]],
        audience: str,
        ssl_context: ssl.SSLContext,
        host: str = "127.0.0.1",
        port: int = 0,
        require_nonce: bool = False,
        accept_bearer: bool = False,
        scope_rules: Iterable[tuple[str, str, str]] = (),
    ) -> None:
        self.issuer = issuer
        self._as_jwks = as_jwks
        self.audience = audience
        self._ssl = ssl_context
        self._host = host
        self._port = port
        self.accept_bearer = accept_bearer
        self.scope_rules = tuple(scope_rules)  # (method, path prefix, scope needed)
        self.proofs = ProofVerifier(require_nonce=require_nonce)
        self.requests: list[SeenRequest] = []
        self.revoked: set[str] = set()  # token jtis this API now rejects as invalid_token
        self.reject_all_tokens = False
        self.started: asyncio.Queue[str] = asyncio.Queue()  # raw paths, as requests arrive
        self.port = 0
        # set: the origin as the sidecar reaches it through a proxy in front (the chaos suite's
        # fault proxy); DPoP htu is then checked against this address.
        self.public_base_url: str | None = None
        self._hang = asyncio.Event()
        self.release = asyncio.Event()  # /wait answers once set: a stall the test ends
        self._runner: web.ServerRunner | None = None

    async def __aenter__(self) -> DevSaasApi:
        server = web.Server(self._handle, access_log=None, auto_decompress=False)
        runner = self._runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl)
        await site.start()
        self.port = runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._hang.set()
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        if self.public_base_url is not None:
            return self.public_base_url
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"https://{host}:{self.port}"

    # -- the API ------------------------------------------------------------------------------
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.started.put_nowait(request.raw_path)  # before the body: tests see it in flight
        digest = hashlib.sha256()
        length = 0
        echo = bytearray() if request.path == "/echo" else None
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
            if echo is not None and len(echo) < 1 << 20:
                echo.extend(chunk)
        seen = SeenRequest(
            method=request.method,
            raw_path=request.raw_path,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            body_sha256=digest.hexdigest(),
            body_len=length,
            token_claims=None,
            proof_claims=None,
            status=0,
        )
        self.requests.append(seen)
        try:
            self._authorize(request, seen)
        except _Denied as exc:
            seen.status, seen.error = exc.status, exc.error
            challenge = f'DPoP error="{exc.error}", algs="ES256"'
            headers = {"WWW-Authenticate": challenge}
            if exc.nonce:
                headers["DPoP-Nonce"] = exc.nonce
            return web.json_response(
                {"error": exc.error, "error_description": exc.description},
                status=exc.status,
                headers=headers,
            )
        response = await self._respond(request, seen, echo)
        seen.status = response.status
        return response

    async def _respond(
        self, request: web.BaseRequest, seen: SeenRequest, echo: bytearray | None
    ) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        if parts[0] == "download" and len(parts) == 2 and parts[1].isdigit():
            size = min(int(parts[1]), MAX_DOWNLOAD)
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = size
            await response.prepare(request)
            remaining = size
            while remaining:
                piece = _CHUNK[: min(remaining, len(_CHUNK))]
                await response.write(piece)
                remaining -= len(piece)
            await response.write_eof()
            return response
        if parts[0] == "status" and len(parts) == 2 and parts[1].isdigit():
            return web.json_response({"status": int(parts[1])}, status=int(parts[1]))
        if parts[0] == "hang":  # never answers until the server stops: timeout tests
            await self._hang.wait()
            raise web.HTTPServiceUnavailable()
        if parts[0] == "wait":  # stalls until the test sets `release`, then answers
            await self.release.wait()
            return web.json_response({"ok": True, "path": request.raw_path})
        if parts[0] == "headers":
            return web.json_response({"headers": seen.headers})
        if echo is not None:
            return web.Response(body=bytes(echo), content_type="application/octet-stream")
        claims = seen.token_claims or {}
        return web.json_response(
            {
                "ok": True,
                "method": request.method,
                "path": request.raw_path,
                "caller": claims.get("sub"),
                "scope": claims.get("scope"),
                "body_sha256": seen.body_sha256,
                "body_len": seen.body_len,
            }
        )

    # -- authorization ------------------------------------------------------------------------
    def _authorize(self, request: web.BaseRequest, seen: SeenRequest) -> None:
        authz = request.headers.getall("Authorization", [])
        if len(authz) != 1:
            raise _Denied(401, "invalid_request", "exactly one Authorization header is required")
        scheme, _, token = authz[0].partition(" ")
        scheme = scheme.lower()
        if scheme not in ("dpop", "bearer") or not token:
            raise _Denied(401, "invalid_token", "unsupported authorization scheme")
        claims = self._verify_token(token)
        seen.token_claims = claims
        if self.reject_all_tokens or claims.get("jti") in self.revoked:
            raise _Denied(401, "invalid_token", "token revoked")
        bound = isinstance(claims.get("cnf"), dict) and "jkt" in claims["cnf"]
        if scheme == "bearer":
            if bound:
                raise _Denied(401, "invalid_token", "a DPoP-bound token was sent as Bearer")
            if not self.accept_bearer:
                raise _Denied(401, "invalid_token", "this API requires DPoP-bound tokens")
        else:
            if not bound:
                raise _Denied(401, "invalid_token", "token is not DPoP-bound")
            seen.proof_claims = self._verify_proof(request, token, claims["cnf"]["jkt"])
        self._check_scope(request, claims)

    def _verify_token(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("typ", "").lower() not in ("at+jwt", "application/at+jwt"):
                raise _Denied(401, "invalid_token", "not an RFC 9068 access token")
            keys = {k.get("kid"): k for k in self._as_jwks().get("keys", [])}
            jwk = keys.get(header.get("kid"))
            if jwk is None:
                raise _Denied(401, "invalid_token", "unknown signing key")
            claims: dict[str, Any] = jwt.decode(
                token,
                jwt.PyJWK(jwk).key,
                algorithms=["ES256"],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["iss", "sub", "aud", "exp", "iat"]},
            )
        except jwt.PyJWTError as exc:
            raise _Denied(401, "invalid_token", f"token rejected: {exc}") from exc
        return claims

    def _verify_proof(self, request: web.BaseRequest, token: str, jkt: str) -> dict[str, Any]:
        proofs = request.headers.getall("DPoP", [])
        if len(proofs) != 1:
            raise _Denied(401, "invalid_dpop_proof", "exactly one DPoP proof is required")
        url = f"{self.base_url}{request.raw_path.partition('?')[0]}"
        try:
            proof = self.proofs.verify(
                proofs[0], method=request.method, url=url, access_token=token, now=time.time()
            )
        except ProofError as exc:
            nonce = self.proofs.nonce if exc.error == "use_dpop_nonce" else None
            raise _Denied(401, exc.error, exc.description, nonce) from exc
        if proof.jkt != jkt:
            raise _Denied(401, "invalid_dpop_proof", "proof key does not match cnf.jkt")
        return proof.claims

    def _check_scope(self, request: web.BaseRequest, claims: Mapping[str, Any]) -> None:
        granted = set(str(claims.get("scope", "")).split())
        for method, prefix, scope in self.scope_rules:
            if request.method == method and request.path.startswith(prefix):
                if scope not in granted:
                    raise _Denied(403, "insufficient_scope", f"{scope} is required")
                return
