"""The pod CA: the trust anchor the app is given so the sidecar can terminate its TLS.

An ECDSA P-256 CA made by the sidecar when none is provided, or taken from a mounted Secret
(``tls.crt`` / ``tls.key``, as cert-manager writes them). Its private key lives in memory and,
to survive a sidecar restart within the pod (the app loaded the CA once, at its start), in the
sidecar's own directory (``intercept.ca_dir``, an emptyDir the app does not mount).

Name constraints (RFC 5280 §4.2.1.10, critical): the permitted dNSName subtrees are the hosts
of the intercepting routes (``*.saas.example`` permits the ``saas.example`` subtree), and every
IPv4/IPv6 address is excluded, so a stolen CA key cannot impersonate anything else.

Leaf certificates are minted per host, short-lived (``leaf_hours``), and re-minted when a third
of their life is left. Everything here is synchronous CPU or file work: callers run it off the
event loop (:mod:`sidecar.proxy.intercept.server`).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import secrets
import ssl
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("sidecar.intercept")

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
# What the app's container reads (the export directory):
EXPORT_CA = "ca.pem"  # the pod CA alone (NODE_EXTRA_CA_CERTS adds it to Node's own list)
EXPORT_BUNDLE = "ca-bundle.pem"  # system CAs + the pod CA (SSL_CERT_FILE, REQUESTS_CA_BUNDLE…)
EXPORT_TRUSTSTORE = "truststore.p12"  # the same as a PKCS#12 truststore for the JVM

CA_YEARS = 5
_CLOCK_SKEW = datetime.timedelta(minutes=5)


class CAError(Exception):
    """The CA cannot be loaded or used as configured; the message says what to fix."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def permitted_names(hosts: Iterable[str]) -> tuple[str, ...]:
    """The dNSName subtrees for the routed hosts: ``*.x.example`` -> ``x.example``."""
    return tuple(sorted({h[2:] if h.startswith("*.") else h for h in hosts}))


def _name_constraints(hosts: Iterable[str]) -> x509.NameConstraints:
    permitted = [x509.DNSName(name) for name in permitted_names(hosts)]
    excluded: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
        x509.IPAddress(ipaddress.ip_network("::/0")),
    ]
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)


def _within(name: str, subtree: str) -> bool:
    """RFC 5280 §4.2.1.10 for dNSName: the name itself or any name below it."""
    return name == subtree or name.endswith("." + subtree)


@dataclass(frozen=True)
class Leaf:
    """A host's certificate and key as PEM (loaded into an SSLContext), and when it expires."""

    host: str
    chain_pem: bytes  # leaf, then the CA
    key_pem: bytes
    not_after: datetime.datetime
    renew_at: datetime.datetime

    def __repr__(self) -> str:
        return f"Leaf({self.host!r}, not_after={self.not_after.isoformat()})"


class PodCA:
    """A CA certificate and its key. ``repr`` never shows the key."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self._key = key
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    def __repr__(self) -> str:
        return f"PodCA(subject={self.cert.subject.rfc4514_string()!r})"

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()

    # -- making and loading --------------------------------------------------------------------

    @classmethod
    def create(cls, hosts: Iterable[str]) -> PodCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spiffe-oauth-sidecar"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"pod CA {secrets.token_hex(4)}"),
            ]
        )
        now = _now()
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(_name_constraints(hosts), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, where: str) -> PodCA:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as exc:
            raise CAError(f"{where}: not a PEM certificate and unencrypted key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{where}: the CA key must be an ECDSA key (P-256)")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise CAError(f"{where}: the key does not belong to the certificate")
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            basic = None
        if basic is None or not basic.ca:
            raise CAError(f"{where}: the certificate is not a CA (basicConstraints CA:TRUE)")
        return cls(cert, key)

    def permitted(self) -> tuple[str, ...] | None:
        """The permitted dNSName subtrees, or None when the CA has no name constraints."""
        try:
            nc = self.cert.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            return None
        return tuple(t.value for t in nc.permitted_subtrees or () if isinstance(t, x509.DNSName))

    def covers(self, host: str) -> bool:
        """Whether a leaf for ``host`` would pass this CA's name constraints."""
        permitted = self.permitted()
        return permitted is not None and any(_within(host, p) for p in permitted)

    def uncovered(self, hosts: Iterable[str]) -> list[str]:
        return [h for h in hosts if not self.covers(h[2:] if h.startswith("*.") else h)]

    # -- leaves ------------------------------------------------------------------------------

    def issue(self, host: str, hours: float, *, now: datetime.datetime | None = None) -> Leaf:
        """A serverAuth leaf for ``host``, valid ``hours`` (clamped to the CA's validity)."""
        now = now or _now()
        not_after = min(now + datetime.timedelta(hours=hours), self.cert.not_valid_after_utc)
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        ca_public = self._key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        life = not_after - now
        return Leaf(
            host=host,
            chain_pem=cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem,
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            not_after=not_after,
            renew_at=not_after - life / 3,
        )

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Keep the CA in the sidecar's own directory: the key 0600, written atomically."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(directory / CA_KEY, key_pem, 0o600)
        _write(directory / CA_CERT, self.cert_pem, 0o644)

    def exports(self) -> dict[str, bytes]:
        """What the app's container reads: the CA, the bundle, the JVM truststore."""
        system = system_ca_pem()
        bundle = system + (b"" if not system or system.endswith(b"\n") else b"\n") + self.cert_pem
        return {
            EXPORT_CA: self.cert_pem,
            EXPORT_BUNDLE: bundle,
            EXPORT_TRUSTSTORE: truststore(self.cert, system),
        }

    def export(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.exports().items():
            _write(directory / name, data, 0o644)


def system_ca_pem() -> bytes:
    """The system CA bundle OpenSSL uses by default (certifi is not a dependency)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return Path(candidate).read_bytes()
    log.warning(
        "no system CA bundle found: the exported bundle holds only the pod CA",
        extra={"openssl_cafile": paths.openssl_cafile},
    )
    return b""


def truststore(ca: x509.Certificate, system_pem: bytes) -> bytes:
    """A PKCS#12 truststore without a password: the pod CA and the system CAs as trusted
    certificate entries (Java reads only entries marked trusted; JAVA_TOOL_OPTIONS replaces the
    JVM's default truststore, so the system CAs must be in it too)."""
    certs = [pkcs12.PKCS12Certificate(ca, b"spiffe-oauth-sidecar-pod-ca")]
    seen = {ca.fingerprint(hashes.SHA256())}
    for index, cert in enumerate(_certificates(system_pem)):
        fp = cert.fingerprint(hashes.SHA256())
        if fp not in seen:
            seen.add(fp)
            certs.append(pkcs12.PKCS12Certificate(cert, f"system-{index}".encode()))
    return pkcs12.serialize_java_truststore(certs, serialization.NoEncryption())


_PEM_END = b"-----END CERTIFICATE-----"


def _certificates(pem: bytes) -> Iterable[x509.Certificate]:
    """The bundle's certificates one by one: an entry cryptography refuses (some old roots have
    a negative serial) is left out, not the whole bundle."""
    for block in pem.split(_PEM_END)[:-1]:
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start < 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                yield x509.load_pem_x509_certificate(block[start:] + _PEM_END + b"\n")
            except ValueError:
                continue


def _write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_create(
    hosts: Iterable[str], *, ca_dir: Path | None, provided: Path | None
) -> tuple[PodCA, str]:
    """The pod CA and where it came from (``provided`` / ``kept`` / ``created``).

    ``provided``: a mounted Secret directory with ``tls.crt`` and ``tls.key``; it must carry
    name constraints covering every intercepting host. Otherwise the CA kept in ``ca_dir`` is
    reused if its constraints still cover the hosts, else a new one is made (and kept there).
    """
    hosts = tuple(hosts)
    if provided is not None:
        try:
            cert_pem = (provided / "tls.crt").read_bytes()
            key_pem = (provided / "tls.key").read_bytes()
        except OSError as exc:
            raise CAError(f"{provided}: cannot read tls.crt and tls.key ({exc.strerror})") from exc
        ca = PodCA.from_pem(cert_pem, key_pem, str(provided))
        if ca.permitted() is None:
            raise CAError(
                f"{provided}: the CA has no name constraints; a CA the app trusts must be limited "
                "to the intercepted hosts (cert-manager: spec.nameConstraints.permitted.dnsDomains)"
            )
        missing = ca.uncovered(hosts)
        if missing:
            raise CAError(
                f"{provided}: the CA's name constraints do not cover {', '.join(missing)}"
            )
        return ca, "provided"
    if ca_dir is not None and (ca_dir / CA_KEY).exists():
        try:
            ca = PodCA.from_pem(
                (ca_dir / CA_CERT).read_bytes(), (ca_dir / CA_KEY).read_bytes(), str(ca_dir)
            )
        except (OSError, CAError) as exc:
            log.warning(
                "the kept pod CA cannot be used; making a new one",
                extra={"dir": str(ca_dir), "error": str(exc)},
            )
        else:
            missing = ca.uncovered(hosts)
            if not missing and ca.cert.not_valid_after_utc > _now() + datetime.timedelta(days=1):
                return ca, "kept"
            log.warning(
                "the kept pod CA does not cover the intercepting routes; making a new one "
                "(apps that loaded the old CA must restart)",
                extra={"dir": str(ca_dir), "hosts": ", ".join(missing)},
            )
    ca = PodCA.create(hosts)
    if ca_dir is not None:
        ca.save(ca_dir)
    return ca, "created"
