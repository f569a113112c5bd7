"""DEVELOPMENT ONLY: strict DPoP proof verification (RFC 9449 §4.3) for the dev peers.

Deliberately independent of :mod:`sidecar.credentials.dpop`: it parses the proof with pyjwt,
recomputes the thumbprint from the JWK itself and checks every rule of §4.3, so a bug in the
sidecar's proof code shows up as a rejected request instead of agreeing with itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt

ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA")
_REQUIRED_JWK = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}
_PRIVATE_JWK = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


class ProofError(Exception):
    """The proof is unacceptable; ``error`` is the OAuth error code to answer with."""

    def __init__(self, description: str, error: str = "invalid_dpop_proof") -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint, computed from the required members only."""
    required = _REQUIRED_JWK.get(str(jwk.get("kty")))
    if required is None or any(name not in jwk for name in required):
        raise ProofError("unsupported or incomplete jwk")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def normalize_htu(url: str) -> str:
    """Scheme and host lower-case, default port dropped, no query or fragment, empty path → /."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and (scheme, port) not in (("https", 443), ("http", 80)):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path or "/", "", ""))


@dataclass(frozen=True)
class VerifiedProof:
    claims: dict[str, Any]
    header: dict[str, Any]
    jkt: str


class ProofVerifier:
    """Checks DPoP proofs for one server: replay (jti), freshness (iat) and optional nonces."""

    def __init__(
        self,
        *,
        require_nonce: bool = False,
        max_age: float = 60.0,
        clock_skew: float = 5.0,
        replay_window: int = 100_000,
    ) -> None:
        self.require_nonce = require_nonce
        self.max_age = max_age
        self.clock_skew = clock_skew
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._replay_window = replay_window
        self._nonces = [secrets.token_urlsafe(16)]

    @property
    def nonce(self) -> str:
        return self._nonces[-1]

    def rotate_nonce(self) -> str:
        """A new nonce; the previous one stays acceptable for one more rotation."""
        self._nonces = [self._nonces[-1], secrets.token_urlsafe(16)]
        return self.nonce

    def verify(
        self,
        proof: str,
        *,
        method: str,
        url: str,
        access_token: str | None = None,
        now: float | None = None,
    ) -> VerifiedProof:
        now = time.time() if now is None else now
        try:
            header = jwt.get_unverified_header(proof)
        except jwt.PyJWTError as exc:
            raise ProofError(f"proof is not a JWS: {exc}") from exc
        if header.get("typ") != "dpop+jwt":
            raise ProofError("typ must be dpop+jwt")
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise ProofError(f"alg {alg!r} is not an accepted asymmetric algorithm")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            raise ProofError("jwk header missing")
        if _PRIVATE_JWK & set(jwk):
            raise ProofError("jwk contains private key material")
        jkt = jwk_thumbprint(jwk)
        try:
            key = jwt.PyJWK(jwk, algorithm=alg).key
            claims: dict[str, Any] = jwt.decode(
                proof,
                key,
                algorithms=[alg],
                options={
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_iat": False,
                    "require": ["jti", "htm", "htu", "iat"],
                },
            )
        except jwt.PyJWTError as exc:
            raise ProofError(f"proof signature or claims invalid: {exc}") from exc
        if claims["htm"] != method:
            raise ProofError(f"htm {claims['htm']!r} does not match {method!r}")
        if normalize_htu(str(claims["htu"])) != normalize_htu(url):
            raise ProofError(f"htu {claims['htu']!r} does not match {normalize_htu(url)!r}")
        iat = claims["iat"]
        if not isinstance(iat, int | float) or not (
            now - self.max_age <= iat <= now + self.clock_skew
        ):
            raise ProofError("iat outside the acceptable window")
        if access_token is not None:
            expected = _b64url(hashlib.sha256(access_token.encode()).digest())
            if claims.get("ath") != expected:
                raise ProofError("ath does not match the access token")
        if self.require_nonce and claims.get("nonce") not in self._nonces:
            raise ProofError("a fresh nonce is required", error="use_dpop_nonce")
        jti = str(claims["jti"])
        if jti in self._seen:
            raise ProofError("jti replayed")
        self._seen[jti] = now
        while len(self._seen) > self._replay_window:
            self._seen.popitem(last=False)
        return VerifiedProof(claims=claims, header=header, jkt=jkt)
