"""The pod CA: name constraints enforced by real OpenSSL verification, leaves re-minted before
expiry and cached within bounds, persistence, exports (the JVM truststore read by keytool)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import shutil
import ssl
import subprocess
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from sidecar.proxy.intercept.ca import (
    CA_KEY,
    EXPORT_BUNDLE,
    EXPORT_CA,
    EXPORT_TRUSTSTORE,
    CAError,
    Leaf,
    PodCA,
    load_or_create,
)
from sidecar.proxy.intercept.server import ServerContexts, _load_chain

HOSTS = ("api.saas.example", "*.vendor.example")


async def verify_over_tls(ca: PodCA, leaf: Leaf, name: str) -> str | None:
    """A real handshake on loopback: the server presents ``leaf``, a client that trusts only the
    pod CA connects for ``name``. Returns OpenSSL's verification message, or None if it passed."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(server_ctx, leaf)
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.read(1)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=name
        )
    except ssl.SSLCertVerificationError as exc:
        return exc.verify_message
    else:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        return None
    finally:
        server.close()
        await server.wait_closed()


def signed_by(ca: PodCA, san: x509.GeneralName, cn: str = "x") -> Leaf:
    """What a stolen CA key could sign: any name, outside the sidecar's own code path."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .sign(ca._key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem
    return Leaf(cn, chain, key_pem, now, now)


async def test_routed_hosts_verify_and_their_wildcard_domains_too() -> None:
    ca = PodCA.create(HOSTS)
    assert await verify_over_tls(ca, ca.issue("api.saas.example", 1), "api.saas.example") is None
    assert await verify_over_tls(ca, ca.issue("eu.vendor.example", 1), "eu.vendor.example") is None


@pytest.mark.parametrize(
    "name",
    ["unrouted.example", "saas.example", "api.saas.example.evil", "evilapi.saas.example", "com"],
)
async def test_openssl_rejects_a_leaf_for_an_unrouted_name(name: str) -> None:
    ca = PodCA.create(HOSTS)
    message = await verify_over_tls(ca, signed_by(ca, x509.DNSName(name), cn=name), name)
    assert message == "permitted subtree violation"


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "::1"])
async def test_openssl_rejects_a_leaf_for_any_ip_address(address: str) -> None:
    ca = PodCA.create(HOSTS)
    leaf = signed_by(ca, x509.IPAddress(ipaddress.ip_address(address)))
    assert await verify_over_tls(ca, leaf, address) == "excluded subtree violation"


def test_the_constraints_are_critical_and_the_ca_is_p256() -> None:
    ca = PodCA.create(HOSTS)
    ext = ca.cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    assert ca.permitted() == ("api.saas.example", "vendor.example")
    assert isinstance(ca.cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca.cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert "PRIVATE" not in repr(ca)
    assert ca.covers("api.saas.example")
    assert ca.covers("eu.vendor.example")
    assert not ca.covers("saas.example")
    assert ca.uncovered(["api.saas.example", "*.vendor.example", "new.example"]) == ["new.example"]


def test_leaves_are_short_lived_and_name_one_host() -> None:
    ca = PodCA.create(HOSTS)
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    leaf = ca.issue("api.saas.example", 12, now=now)
    cert = x509.load_pem_x509_certificate(leaf.chain_pem)
    assert cert.not_valid_after_utc == now + datetime.timedelta(hours=12)
    assert leaf.renew_at == now + datetime.timedelta(hours=8)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.saas.example"]
    assert "PRIVATE" not in repr(leaf)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now


async def test_a_leaf_is_reminted_before_it_expires_and_the_cache_is_bounded() -> None:
    clock = Clock()
    contexts = ServerContexts(PodCA.create(HOSTS), 12, now=clock, max_hosts=3)
    first = await contexts.get("api.saas.example")
    assert await contexts.get("api.saas.example") is first  # cached
    clock.now += datetime.timedelta(hours=7, minutes=59)
    assert await contexts.get("api.saas.example") is first
    clock.now += datetime.timedelta(minutes=2)  # past two thirds of its life
    second = await contexts.get("api.saas.example")
    assert second is not first
    assert second.leaf.not_after > first.leaf.not_after
    for label in range(10):
        await contexts.get(f"h{label}.vendor.example")
    assert len(contexts) == 3
    assert contexts.minted == 12


async def test_concurrent_connections_for_a_new_host_mint_one_leaf() -> None:
    contexts = ServerContexts(PodCA.create(HOSTS), 12)
    made = await asyncio.gather(*(contexts.get("api.saas.example") for _ in range(8)))
    assert contexts.minted == 1
    assert all(m is made[0] for m in made)


def test_the_ca_is_kept_and_reused_and_remade_when_routes_outgrow_it(tmp_path: Path) -> None:
    first, origin = load_or_create(HOSTS, ca_dir=tmp_path, provided=None)
    assert origin == "created"
    assert (tmp_path / CA_KEY).stat().st_mode & 0o777 == 0o600
    again, origin = load_or_create(HOSTS, ca_dir=tmp_path, provided=None)
    assert (origin, again.fingerprint) == ("kept", first.fingerprint)
    grown, origin = load_or_create((*HOSTS, "new.example"), ca_dir=tmp_path, provided=None)
    assert origin == "created"
    assert grown.fingerprint != first.fingerprint
    assert grown.covers("new.example")


def test_a_provided_ca_must_be_name_constrained(tmp_path: Path) -> None:
    ca = PodCA.create(HOSTS)
    ca.save(tmp_path)
    (tmp_path / "tls.crt").write_bytes((tmp_path / "ca.pem").read_bytes())
    (tmp_path / "tls.key").write_bytes((tmp_path / CA_KEY).read_bytes())
    provided, origin = load_or_create(HOSTS, ca_dir=None, provided=tmp_path)
    assert (origin, provided.fingerprint) == ("provided", ca.fingerprint)
    with pytest.raises(CAError, match=r"do not cover other\.example"):
        load_or_create(("other.example",), ca_dir=None, provided=tmp_path)
    # A CA without name constraints (as cert-manager issues one without nameConstraints).
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unconstrained")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CAError, match="no name constraints"):
        load_or_create(HOSTS, ca_dir=None, provided=tmp_path)


def test_exports_hold_the_ca_the_bundle_and_a_truststore(tmp_path: Path) -> None:
    ca = PodCA.create(HOSTS)
    ca.export(tmp_path)
    assert (tmp_path / EXPORT_CA).read_bytes() == ca.cert_pem
    bundle = (tmp_path / EXPORT_BUNDLE).read_bytes()
    assert bundle.endswith(ca.cert_pem)
    # The system CAs too (SSL_CERT_FILE replaces OpenSSL's default file).
    assert bundle.count(b"-----BEGIN CERTIFICATE-----") > 1
    assert not list(tmp_path.glob("*key*"))  # the key is never exported
    with warnings.catch_warnings():  # some system roots have a negative serial
        warnings.simplefilter("ignore")
        store = pkcs12.load_pkcs12((tmp_path / EXPORT_TRUSTSTORE).read_bytes(), None)
    assert store.key is None
    assert ca.cert in [c.certificate for c in store.additional_certs]


@pytest.mark.skipif(shutil.which("keytool") is None, reason="no JDK")
def test_keytool_reads_the_truststore_as_trusted_certificate_entries(tmp_path: Path) -> None:
    ca = PodCA.create(HOSTS)
    ca.export(tmp_path)
    listing = subprocess.run(  # noqa: S603
        [  # noqa: S607
            "keytool",
            "-list",
            "-v",
            "-storetype",
            "PKCS12",
            "-keystore",
            str(tmp_path / EXPORT_TRUSTSTORE),
            "-storepass",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "Alias name: spiffe-oauth-sidecar-pod-ca" in listing
    entry = listing.split("Alias name: spiffe-oauth-sidecar-pod-ca", 1)[1].split("Alias name:")[0]
    assert "Entry type: trustedCertEntry" in entry
    assert ca.cert.subject.rfc4514_string().split(",")[0].split("=")[1] in entry
