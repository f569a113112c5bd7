"""DEVELOPMENT ONLY: a throwaway CA for loopback TLS and a SPIFFE trust domain.

Everything here lives in memory for one run of the demo or one test. The SVIDs follow the
rules the ``spiffe`` client enforces (leaf CA=false, KeyUsage digitalSignature only, exactly
one URI SAN) so that the real client accepts what the dev Workload API serves.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import secrets
import ssl
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_PRIVATE_PEM = serialization.PrivateFormat.PKCS8
_NO_PASSWORD = serialization.NoEncryption()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, _PRIVATE_PEM, _NO_PASSWORD)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing only; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True)
class TlsMaterial:
    """A certificate chain and its key, PEM encoded."""

    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return "TlsMaterial(<certificate and key>)"

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        cert = directory / f"{stem}.pem"
        key = directory / f"{stem}-key.pem"
        cert.write_bytes(self.cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(self.key_pem)
        return cert, key

    def server_context(self, client_ca_pem: bytes | None = None) -> ssl.SSLContext:
        """A TLS server context; with ``client_ca_pem``, clients may present a certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._load_into(context)
        if client_ca_pem is not None:
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(cadata=client_ca_pem.decode())
        return context

    def _load_into(self, context: ssl.SSLContext) -> None:
        # load_cert_chain reads files only: use a private directory that is gone at once.
        with tempfile.TemporaryDirectory(prefix="sidecar-tls-") as tmp:
            cert, key = self.write(Path(tmp), "tls")
            context.load_cert_chain(cert, key)


class DevCA:
    """A CA for the dev stack's HTTPS servers (and, for mTLS tests, their clients)."""

    def __init__(self, common_name: str = "sidecar dev CA (not for production)") -> None:
        self._key = _key()
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self.certificate.public_bytes(serialization.Encoding.PEM)

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    def _leaf(
        self,
        subject: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        ttl: dt.timedelta,
    ) -> TlsMaterial:
        key = _key()
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return TlsMaterial(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def issue_server(self, *names: str, ttl: dt.timedelta = dt.timedelta(days=1)) -> TlsMaterial:
        names = names or ("localhost", "127.0.0.1")
        return self._leaf(names[0], [_san(n) for n in names], ExtendedKeyUsageOID.SERVER_AUTH, ttl)

    def issue_client(self, uri_san: str, ttl: dt.timedelta = dt.timedelta(hours=1)) -> TlsMaterial:
        return self._leaf(
            "dev client",
            [x509.UniformResourceIdentifier(uri_san)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            ttl,
        )

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cadata=self.cert_pem.decode())


@dataclass(frozen=True)
class X509SvidMaterial:
    """An X.509-SVID as the Workload API serves it: DER chain, PKCS#8 DER key."""

    spiffe_id: str
    chain_der: bytes
    key_der: bytes
    certificate: x509.Certificate
    expires_at: float

    def __repr__(self) -> str:
        return f"X509SvidMaterial({self.spiffe_id!r}, <key>)"

    def tls(self) -> TlsMaterial:
        key = serialization.load_der_private_key(self.key_der, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return TlsMaterial(self.certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


class TrustDomain:
    """A SPIFFE trust domain: an X.509 authority for SVIDs and JWT signing keys.

    ``rotate_jwt_key`` adds a new signing key; the JWKS keeps the old one so already issued
    JWT-SVIDs stay valid, as a SPIRE server does during key rotation.
    """

    def __init__(self, name: str = "example.org") -> None:
        self.name = name
        self._ca = DevCA(f"{name} SPIFFE authority (dev)")
        # SPIFFE bundles identify the trust domain by URI SAN on the CA.
        self._jwt_keys: list[tuple[str, ec.EllipticCurvePrivateKey]] = []
        self.rotate_jwt_key()

    # -- X.509 -------------------------------------------------------------------------------
    @property
    def x509_bundle_der(self) -> bytes:
        return self._ca.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def x509_bundle_pem(self) -> bytes:
        return self._ca.cert_pem

    def issue_x509_svid(
        self, spiffe_id: str, ttl: dt.timedelta = dt.timedelta(hours=1)
    ) -> X509SvidMaterial:
        key = _key()
        now = _now()
        ca = self._ca
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]))
            .issuer_name(ca._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=False,
            )
            .sign(ca._key, hashes.SHA256())
        )
        return X509SvidMaterial(
            spiffe_id=spiffe_id,
            chain_der=cert.public_bytes(serialization.Encoding.DER),
            key_der=key.private_bytes(serialization.Encoding.DER, _PRIVATE_PEM, _NO_PASSWORD),
            certificate=cert,
            expires_at=cert.not_valid_after_utc.timestamp(),
        )

    # -- JWT ---------------------------------------------------------------------------------
    def rotate_jwt_key(self) -> str:
        kid = secrets.token_hex(8)
        self._jwt_keys.append((kid, _key()))
        return kid

    def issue_jwt_svid(self, spiffe_id: str, audience: Iterable[str], ttl: float = 300.0) -> str:
        """A JWT-SVID as SPIRE mints it: ES256, kid, sub/aud/exp/iat, no iss, no jti."""
        kid, key = self._jwt_keys[-1]
        now = int(time.time())
        audiences = sorted(audience)
        claims: dict[str, Any] = {
            "sub": spiffe_id,
            "aud": audiences[0] if len(audiences) == 1 else audiences,
            "iat": now,
            "exp": now + int(ttl),
        }
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid, "typ": "JWT"})

    def jwks(self) -> dict[str, Any]:
        """The trust domain's JWT bundle (a JWKS, every key with ``kid`` and ``use``)."""
        keys = []
        for kid, key in self._jwt_keys:
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
            jwk.update(kid=kid, use="jwt-svid", alg="ES256")
            keys.append(jwk)
        return {"keys": keys}

    def jwks_bytes(self) -> bytes:
        return json.dumps(self.jwks()).encode()
