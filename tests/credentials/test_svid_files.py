"""Identity from SVID files (``spiffe.files``): what spiffe-helper, tbot or the SPIFFE CSI
driver's file mode write, read like the Workload API's answers, re-read on rotation (atomic
rename, symlink swap), never used past expiry."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from sidecar import config
from sidecar.credentials.svid_files import SvidFiles
from sidecar.devstack.pki import TrustDomain, X509SvidMaterial
from sidecar.devstack.stack import SAAS_HOST, SPIFFE_ID, DevStack
from sidecar.errors import IdentityUnavailable
from tests.conftest import AppClient, running_sidecar
from tests.ops.test_admin import admin_get

URL = f"http://{SAAS_HOST}/v1/invoices"
AUDIENCE = "https://as.example"


def write_x509(directory: Path, svid: X509SvidMaterial) -> None:
    """As spiffe-helper does: PEM chain, PKCS#8 PEM key, replaced by an atomic rename each."""
    key = serialization.load_der_private_key(svid.key_der, None)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for name, data in (
        ("svid.pem", svid.certificate.public_bytes(serialization.Encoding.PEM)),
        ("svid_key.pem", pem_key),
    ):
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / name)


def swap_in(root: Path, generation: int, svid: X509SvidMaterial) -> None:
    """As the kubelet updates a projected volume: a new timestamped dir, ``..data`` swapped."""
    target = root / f"..{generation}"
    target.mkdir()
    write_x509(target, svid)
    link = root / "..data_tmp"
    link.symlink_to(target.name)
    os.replace(link, root / "..data")
    for name in ("svid.pem", "svid_key.pem"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(Path("..data") / name)


def file_set(directory: Path, jwt: dict[str, Path] | None = None, **kw: Any) -> config.SvidFileSet:
    return config.SvidFileSet(
        x509_svid=directory / "svid.pem",
        x509_key=directory / "svid_key.pem",
        bundle=kw.get("bundle"),
        jwt_svids=jwt or {},
        interval=0.02,
    )


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_x509_from_files_rotates_by_rename_and_by_symlink_swap(tmp_path: Path) -> None:
    domain = TrustDomain()
    plain, swapped = tmp_path / "plain", tmp_path / "projected"
    plain.mkdir()
    swapped.mkdir()
    for directory, rotate in ((plain, "rename"), (swapped, "swap")):
        first = domain.issue_x509_svid(SPIFFE_ID)
        if rotate == "rename":
            write_x509(directory, first)
        else:
            swap_in(directory, 1, first)
        bundle = directory.parent / f"{rotate}-bundle.pem"
        bundle.write_bytes(domain.x509_bundle_pem)
        identity = SvidFiles(file_set(directory, bundle=bundle))
        try:
            rotated: asyncio.Queue[str] = asyncio.Queue()
            identity.on_x509_rotation(lambda m, queue=rotated: queue.put_nowait(m.fingerprint))
            await identity.wait_until_ready(AUDIENCE, x509=True)
            assert identity.state == "ready"
            assert identity.spiffe_id == SPIFFE_ID
            assert (await identity.x509_svid()).fingerprint == _fingerprint(first)
            second = domain.issue_x509_svid(SPIFFE_ID)
            if rotate == "rename":
                write_x509(directory, second)
            else:
                swap_in(directory, 2, second)
            new = await asyncio.wait_for(rotated.get(), 10)
            assert new == _fingerprint(second)
            assert (await identity.x509_svid()).fingerprint == new
        finally:
            await identity.close()


def _fingerprint(svid: X509SvidMaterial) -> str:
    return hashlib.sha256(svid.chain_der).hexdigest()


async def test_an_expired_x509_svid_is_never_used(tmp_path: Path) -> None:
    domain = TrustDomain()
    svid = domain.issue_x509_svid(SPIFFE_ID, ttl=dt.timedelta(minutes=10))
    write_x509(tmp_path, svid)
    clock = Clock()
    identity = SvidFiles(file_set(tmp_path), clock=clock)
    try:
        assert (await identity.x509_svid()).spiffe_id == SPIFFE_ID
        clock.now = svid.expires_at + 1  # the writer died; the file stays
        with pytest.raises(IdentityUnavailable, match="expired"):
            await identity.x509_svid()
        assert identity.x509 is None  # the data path's fast read sees nothing either
        assert identity.state == "expired"  # as with the Workload API socket
        assert identity.problem(need_x509=True) is not None
        later = domain.issue_x509_svid(SPIFFE_ID, ttl=dt.timedelta(hours=1))
        rotated = asyncio.Event()
        identity.on_x509_rotation(lambda _: rotated.set())
        write_x509(tmp_path, later)  # the writer is back
        await asyncio.wait_for(rotated.wait(), 10)
        assert identity.state == "ready"
        assert (await identity.x509_svid()).fingerprint == _fingerprint(later)
    finally:
        await identity.close()


async def test_a_chain_not_issued_by_the_bundle_is_refused(tmp_path: Path) -> None:
    write_x509(tmp_path, TrustDomain().issue_x509_svid(SPIFFE_ID))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(TrustDomain().x509_bundle_pem)  # another authority
    identity = SvidFiles(file_set(tmp_path, bundle=bundle))
    try:
        with pytest.raises(IdentityUnavailable, match="not issued by the trust bundle"):
            await identity.x509_svid()
        assert identity.state == "waiting"
    finally:
        await identity.close()


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"ttl": -30}, "expired"),
        ({"audience": ["https://other.example"]}, "not for audience"),
    ],
)
async def test_an_unusable_jwt_svid_file_is_refused(
    tmp_path: Path, claims: dict[str, Any], message: str
) -> None:
    domain = TrustDomain()
    token = domain.issue_jwt_svid(
        SPIFFE_ID, claims.get("audience", [AUDIENCE]), ttl=claims.get("ttl", 300)
    )
    path = tmp_path / "jwt.token"
    path.write_text(token)
    identity = SvidFiles(config.SvidFileSet(None, None, None, {AUDIENCE: path}, 0.02))
    try:
        with pytest.raises(IdentityUnavailable, match=message) as refused:
            await identity.jwt_svid(AUDIENCE)
        assert token not in str(refused.value)
        assert identity.state == "waiting"
    finally:
        await identity.close()


async def test_a_rewritten_jwt_svid_file_is_read_again(tmp_path: Path) -> None:
    domain = TrustDomain()
    path = tmp_path / "jwt.token"
    original = domain.issue_jwt_svid(SPIFFE_ID, [AUDIENCE])
    path.write_text(original)
    identity = SvidFiles(config.SvidFileSet(None, None, None, {AUDIENCE: path}, 0.02))
    try:
        first = await identity.jwt_svid(AUDIENCE)
        assert first.token.reveal() == original
        domain.rotate_jwt_key()
        renewed = domain.issue_jwt_svid(SPIFFE_ID, [AUDIENCE], ttl=600)
        tmp = tmp_path / ".jwt.tmp"
        tmp.write_text(renewed)
        os.replace(tmp, path)
        await identity._check_once()  # a round of the watcher (it also runs on its own)
        assert (await identity.jwt_svid(AUDIENCE)).token.reveal() == renewed
    finally:
        await identity.close()


async def test_the_sidecar_runs_on_svid_files_under_rotation(
    stack: DevStack, tmp_path: Path
) -> None:
    """jwt_svid client auth from a JWT-SVID file and mTLS from the X.509 files, with the
    X.509-SVID replaced while requests are in flight: every request is served."""
    domain = stack.trust_domain
    files = tmp_path / "svids"
    files.mkdir()
    write_x509(files, domain.issue_x509_svid(SPIFFE_ID))
    jwt_file = files / "as.token"
    jwt_file.write_text(domain.issue_jwt_svid(SPIFFE_ID, [stack.auth_server.issuer]))
    bundle = files / "bundle.pem"
    bundle.write_bytes(domain.x509_bundle_pem)
    spiffe = {
        "files": {
            "x509_svid": str(files / "svid.pem"),
            "x509_key": str(files / "svid_key.pem"),
            "bundle": str(bundle),
            "jwt_svids": {stack.auth_server.issuer: str(jwt_file)},
            "interval": 0.02,
        }
    }
    async with running_sidecar(stack, spiffe=spiffe) as sidecar, AppClient(sidecar) as app:
        status, _, body = await app.request("GET", URL)
        assert status == 200, body
        ready, problems = sidecar.readiness()
        assert ready, problems
        # The admin port reports the files' SVIDs as it reports the socket's.
        status, readyz = await admin_get(sidecar, "/readyz")
        assert status == 200, readyz
        _, metrics = await admin_get(sidecar, "/metrics")
        assert 'sidecar_svid_expiry_seconds{type="x509"}' in metrics
        assert 'sidecar_svid_expiry_seconds{type="jwt"}' in metrics
        rotated: asyncio.Queue[str] = asyncio.Queue()
        sidecar.identity.on_x509_rotation(lambda m: rotated.put_nowait(m.fingerprint))
        answers = []
        for _ in range(3):  # bounded: three rotations, ten requests in flight around each
            in_flight = [
                asyncio.ensure_future(app.request("POST", URL, data=b"{}")) for _ in range(10)
            ]
            write_x509(files, domain.issue_x509_svid(SPIFFE_ID))
            await asyncio.wait_for(rotated.get(), 10)
            answers += await asyncio.gather(*in_flight)
        assert [status for status, _, _ in answers] == [200] * 30
    assert stack.workload_api.jwt_svid_requests == []  # no socket was asked
    records = stack.auth_server.token_requests
    assert {r.auth_method for r in records} == {"jwt_spiffe"}
    assert {r.client_id for r in records} == {SPIFFE_ID}


def test_config_takes_files_or_a_socket() -> None:
    base: dict[str, Any] = {
        "authorization_servers": {"as": {"issuer": "https://as.example"}},
        "destinations": [{"host": "api.example", "authorization_server": "as"}],
    }
    files = {"x509_svid": "/run/svid.pem", "x509_key": "/run/key.pem"}
    cfg = config.parse({**base, "spiffe": {"files": files}}, env={"SPIFFE_ENDPOINT_SOCKET": "x"})
    assert cfg.spiffe_socket == ""
    assert cfg.spiffe_files is not None
    assert cfg.spiffe_files.x509_svid == Path("/run/svid.pem")
    with pytest.raises(config.ConfigError) as both:
        config.parse({**base, "spiffe": {"files": files, "socket": "unix:///run/agent.sock"}})
    assert "spiffe.files: use socket or files, not both" in str(both.value)
    with pytest.raises(config.ConfigError) as half:
        config.parse({**base, "spiffe": {"files": {"x509_svid": "/run/svid.pem"}}})
    assert "spiffe.files.x509_key: x509_svid and x509_key go together" in str(half.value)
    with pytest.raises(config.ConfigError) as empty:
        config.parse({**base, "spiffe": {"files": {"bundle": "/run/bundle.pem"}}})
    assert "needs x509_svid and x509_key, or jwt_svids" in str(empty.value)
