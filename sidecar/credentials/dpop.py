"""DPoP (RFC 9449): the sidecar's proof-of-possession key and the proofs it signs. Pure code.

The header (``typ``, ``alg``, public ``jwk``) never changes for a key, so it is encoded once;
per proof only the claims are serialised and signed. Signing uses ``cryptography`` directly:
ES256 is ECDSA P-256 / SHA-256 with the signature as r||s, 32 bytes each (RFC 7518 §3.4), not
DER. This is the hot path's largest fixed cost (see bench/micro).

The private key lives in memory only, for the life of the process; it is never logged,
written or exported (``DpopKey.__repr__`` shows the thumbprint).
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_string

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_DEFAULT_PORTS = {"http": 80, "https": 443}


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64url_bytes(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").translate(_URLSAFE)


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return _b64url_bytes(data).decode("ascii")


class _JtiSource:
    """Random ``jti`` values: 128 bits each from the OS CSPRNG, read 4 KiB at a time rather
    than one system call per proof. Refilled in a forked child so no two processes share."""

    SIZE = 16
    BATCH = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._pool, self._at = b"", 0

    def next(self) -> str:
        at = self._at
        if at + self.SIZE > len(self._pool):
            self._pool, at = os.urandom(self.BATCH), 0
        self._at = at + self.SIZE
        return _b64url_bytes(self._pool[at : at + self.SIZE]).decode("ascii")


_JTI = _JtiSource()


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


def access_token_hash(token: str) -> str:
    """``ath`` (RFC 9449 §4.2): base64url of the SHA-256 of the ASCII access token."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def htu(scheme: str, host: str, port: int | None, path: str) -> str:
    """The ``htu`` claim for a request (RFC 9449 §4.2, RFC 3986 §6.2.2-6.2.3 normalisation).

    No query or fragment; scheme and host lower-case; the default port dropped; an empty path
    becomes ``/``. ``path`` is the path as sent upstream.
    """
    scheme = scheme.lower()
    host = host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    path = path.split("?", 1)[0].split("#", 1)[0] or "/"
    return f"{scheme}://{host}{path}"


class DpopKey:
    """An ES256 key pair with its public JWK, RFC 7638 thumbprint and pre-encoded proof header."""

    alg = "ES256"

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = private_key or ec.generate_private_key(ec.SECP256R1())
        numbers = self._key.public_key().public_numbers()
        self.public_jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big")),
        }
        # RFC 7638 §3.2: required members only, lexicographic order, no white space.
        self.thumbprint = b64url(
            hashlib.sha256(_json(dict(sorted(self.public_jwk.items())))).digest()
        )
        header = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.public_jwk}
        self._header_b64 = b64url(_json(header)).encode() + b"."
        self._clock = clock

    def __repr__(self) -> str:
        return f"DpopKey(jkt={self.thumbprint})"

    def proof(
        self,
        htm: str,
        htu: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        ath: str | None = None,
    ) -> str:
        """A fresh proof JWT for one HTTP request (RFC 9449 §4.2): new ``jti``, current ``iat``.

        ``ath`` may be passed precomputed (it is per token, not per request); otherwise it is
        derived from ``access_token``.
        """
        if ath is None and access_token is not None:
            ath = access_token_hash(access_token)
        # The claims object written directly: every string through the JSON encoder's own
        # escaping (C), the rest are base64url and integers. Same bytes as json.dumps would give.
        claims = (
            f'{{"jti":"{_JTI.next()}","htm":{_json_string(htm)},'
            f'"htu":{_json_string(htu)},"iat":{int(self._clock())}'
        )
        if ath is not None:
            claims += f',"ath":{_json_string(ath)}'
        if nonce is not None:
            claims += f',"nonce":{_json_string(nonce)}'
        signing_input = self._header_b64 + _b64url_bytes((claims + "}").encode())
        r, s = decode_dss_signature(self._key.sign(signing_input, _ECDSA_SHA256))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return signing_input.decode("ascii") + "." + b64url(signature)


class NonceStore:
    """The latest ``DPoP-Nonce`` each origin gave us (RFC 9449 §8, §9). AS and RS differ.

    Bounded: an origin is a configured upstream or AS, but cap it anyway.
    """

    def __init__(self, limit: int = 1024) -> None:
        self._nonces: dict[str, str] = {}
        self._limit = limit

    def get(self, origin: str) -> str | None:
        return self._nonces.get(origin)

    def update(self, origin: str, nonce: str | None) -> None:
        if not nonce or len(nonce) > 512 or not nonce.isascii():
            return
        self._nonces.pop(origin, None)  # re-insert: the dict's order is least recently updated
        if len(self._nonces) >= self._limit:
            self._nonces.pop(next(iter(self._nonces)))
        self._nonces[origin] = nonce
