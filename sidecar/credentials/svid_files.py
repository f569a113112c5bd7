"""Identity from SVID files: for hosts without a Workload API socket.

spiffe-helper, Teleport's tbot and the SPIFFE CSI driver's file mode write the X.509-SVID (PEM
chain, leaf first), its PKCS#8 key, the trust bundle and one JWT-SVID file per audience, and
replace them on rotation by an atomic rename or a symlink swap. :class:`SvidFiles` offers what
:class:`~sidecar.credentials.identity.WorkloadIdentity` offers (it is one: the JWT cache,
readiness states, rotation listeners and audit lines are the same), reading files instead of
the gRPC stream:

- files are read in a worker thread (never on the loop) and watched by their ``stat`` (inode,
  size, mtime, following symlinks), so renames and symlink swaps are seen;
- an SVID is never used past its expiry: an expired X.509-SVID is not presented (state
  ``expired``, as with the socket) until a newer file appears; an expired JWT-SVID file is
  refused;
- every problem with a file becomes :class:`~sidecar.errors.IdentityUnavailable`, naming the
  file, never its content.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from spiffe import X509Svid
from spiffe.errors import PySpiffeError

from sidecar.config import SvidFileSet
from sidecar.credentials.identity import JwtSvid, WorkloadIdentity, X509Material, _x509_material
from sidecar.errors import IdentityUnavailable
from sidecar.secret import Secret

log = logging.getLogger("sidecar.identity")

Stamp = tuple[int, int, int, int] | None  # device, inode, size, mtime_ns of what a path names
_UNSEEN: Stamp = (-1, -1, -1, -1)


def _stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)  # follows symlinks: a swapped link names a new inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class _Context:
    """What :func:`_x509_material` reads from a Workload API X.509 context."""

    default_svid: Any


def read_x509(files: SvidFileSet) -> X509Material:
    """Load and check the X.509-SVID files (blocking: call in a thread)."""
    assert files.x509_svid is not None
    assert files.x509_key is not None
    try:
        svid = X509Svid.load(files.x509_svid, files.x509_key, serialization.Encoding.PEM)
    except PySpiffeError as exc:
        raise IdentityUnavailable(
            f"the X.509-SVID in {files.x509_svid} cannot be used ({type(exc).__name__})"
        ) from exc
    if files.bundle is not None:
        _check_chain(svid.cert_chain, files.bundle)
    return _x509_material(_Context(svid))


def _check_chain(chain: list[x509.Certificate], bundle: Path) -> None:
    """The chain's top certificate must be issued by a certificate of the trust bundle."""
    try:
        authorities = x509.load_pem_x509_certificates(bundle.read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityUnavailable(f"the trust bundle {bundle} cannot be read") from exc
    top = chain[-1]
    for authority in authorities:
        try:
            top.verify_directly_issued_by(authority)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise IdentityUnavailable(f"the X.509-SVID is not issued by the trust bundle {bundle}")


def read_jwt(path: Path, audience: str, now: float) -> JwtSvid:
    """Load the JWT-SVID file for ``audience`` (blocking: call in a thread). Its signature is
    the AS's to check; here only what makes it usable: sub, aud, exp."""
    try:
        token = path.read_text().strip()
        claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    except (OSError, UnicodeError, jwt.PyJWTError) as exc:
        raise IdentityUnavailable(f"the JWT-SVID file {path} cannot be read") from exc
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    sub, exp = claims.get("sub"), claims.get("exp")
    if not isinstance(sub, str) or not sub.startswith("spiffe://"):
        raise IdentityUnavailable(f"the JWT-SVID in {path} has no SPIFFE ID as sub")
    if audience not in audiences:
        raise IdentityUnavailable(f"the JWT-SVID in {path} is not for audience {audience!r}")
    if not isinstance(exp, int | float) or exp <= now:
        raise IdentityUnavailable(f"the JWT-SVID in {path} has expired; waiting for a new one")
    return JwtSvid(Secret(token), sub, audience, issued_at=now, expires_at=float(exp))


class SvidFiles(WorkloadIdentity):
    """The pod's identity read from files (``spiffe.files``), watched for rotation."""

    def __init__(self, files: SvidFileSet, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(f"files:{files.paths[0].parent}", clock=clock)
        self.files = files
        # Every configured file starts as unseen: the watcher's first round reads them all.
        self._stamps: dict[Path, Stamp] = dict.fromkeys(files.paths, _UNSEEN)
        self._watching = False

    async def wait_until_ready(
        self,
        audience: str,
        *,
        x509: bool = False,
        max_delay: float = 30.0,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Ready when the files the config names are usable: the JWT-SVID for ``audience`` if
        a file is configured for it, the X.509-SVID if asked for or configured."""
        delay = 0.1
        while stop is None or not stop.is_set():
            try:
                if audience in self.files.jwt_svids or self.files.x509_svid is None:
                    await self.jwt_svid(audience)
                if x509 or self.files.x509_svid is not None:
                    await self.x509_svid()
                return
            except IdentityUnavailable:
                await asyncio.sleep(delay)  # the writer (spiffe-helper, tbot) may come later
                delay = min(delay * 2, max_delay)

    # -- JWT-SVIDs: the cache and single flight of WorkloadIdentity, a file as the source ---
    async def _fetch_jwt(self, audience: str) -> JwtSvid:
        path = self.files.jwt_svids.get(audience)
        if path is None:
            raise IdentityUnavailable(
                f"no JWT-SVID file is configured for audience {audience!r} (spiffe.files.jwt_svids)"
            )
        self._start_watch()
        self._stamps[path] = await asyncio.to_thread(_stamp, path)
        try:
            svid = await asyncio.to_thread(read_jwt, path, audience, self._clock())
        except IdentityUnavailable as exc:
            self._set_state("unavailable" if self.state == "ready" else "waiting", exc)
            raise
        self._jwt[audience] = svid
        self.spiffe_id = svid.spiffe_id
        self._set_state("ready")
        return svid

    # -- X.509-SVID: held and expired as WorkloadIdentity holds them, a file as the source --
    async def x509_svid(self, *, timeout: float | None = None) -> X509Material:
        await self._watch_x509()
        if self.held_x509 is None:
            await self._load_x509()
        current = self.x509  # None once past notAfter (logged and counted by the parent)
        if current is None:
            raise IdentityUnavailable(
                f"the X.509-SVID in {self.files.x509_svid} has expired; waiting for a new one"
            )
        return current

    async def _load_x509(self) -> None:
        if self.files.x509_svid is None:
            raise IdentityUnavailable("no X.509-SVID file is configured (spiffe.files.x509_svid)")
        for path in self._x509_paths():
            self._stamps[path] = await asyncio.to_thread(_stamp, path)
        try:
            material = await asyncio.to_thread(read_x509, self.files)
        except IdentityUnavailable as exc:
            self._set_state("unavailable" if self.state == "ready" else "waiting", exc)
            raise
        if material.expires_at > self._clock():  # a stale file is not news
            self._x509_arrived(material)  # state, audit line, expiry timer, rotation listeners

    def _x509_paths(self) -> list[Path]:
        paths = [self.files.x509_svid, self.files.x509_key, self.files.bundle]
        return [p for p in paths if p is not None]

    async def _watch_x509(self) -> None:
        self._start_watch()

    def _start_watch(self) -> None:
        if not self._watching:
            self._watching = True
            self._background.spawn(self._watch(), name="svid files watch")

    async def _watch(self) -> None:
        """Poll the files' stamps; reload what changed. Bounded work per round."""
        while True:
            await asyncio.sleep(self.files.interval)
            try:
                await self._check_once()
            except Exception as exc:  # the watcher outlives one bad round
                log.warning("SVID files check failed", extra={"error": type(exc).__name__})
                self._stamps = dict.fromkeys(self._stamps, _UNSEEN)  # read all again next time

    async def _check_once(self) -> None:
        stamps = {p: await asyncio.to_thread(_stamp, p) for p in self._stamps}
        changed = {p for p, s in stamps.items() if s != self._stamps.get(p)}
        # Only what changed is read again: a broken or stale file is reported once per change.
        if self.files.x509_svid is not None and changed & set(self._x509_paths()):
            try:
                await self._load_x509()
            except IdentityUnavailable as exc:
                log.warning("X.509-SVID files not usable", extra={"error": str(exc)})
        for audience, path in self.files.jwt_svids.items():
            if path in changed:
                self._jwt.pop(audience, None)  # the next use reads the new file
                self._stamps[path] = stamps[path]

    async def close(self) -> None:
        await self._background.close()
