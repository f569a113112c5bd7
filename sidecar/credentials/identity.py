"""Identity: the pod's SVIDs from the SPIFFE Workload API (the SPIRE agent socket).

The ``spiffe`` package is synchronous (blocking gRPC), so every call runs in a worker thread
via ``asyncio.to_thread``; the event loop never blocks on it. Its exceptions are converted
here, once, into :class:`~sidecar.errors.IdentityUnavailable`.

JWT-SVIDs are cached per audience and refreshed at half their lifetime (SPIRE's default TTL is
5 minutes), in the background while the cached one is still valid; one fetch per audience
however many callers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes, serialization
from spiffe import WorkloadApiClient
from spiffe.errors import ArgumentError, PySpiffeError

from sidecar.errors import IdentityUnavailable
from sidecar.secret import Secret
from sidecar.tasks import Background, SingleFlight
from sidecar.tls import client_context

log = logging.getLogger("sidecar.identity")

State = Literal["starting", "waiting", "ready", "unavailable"]


@dataclass(frozen=True)
class JwtSvid:
    token: Secret
    spiffe_id: str
    audience: str
    issued_at: float  # epoch seconds (fetch time)
    expires_at: float  # epoch seconds (``exp``)

    @property
    def refresh_at(self) -> float:
        return self.issued_at + (self.expires_at - self.issued_at) / 2

    def usable(self, now: float) -> bool:
        # Stop presenting an assertion a few seconds before exp: the AS may allow no leeway.
        return now < self.expires_at - min(5.0, (self.expires_at - self.issued_at) / 10)


@dataclass(frozen=True)
class X509Material:
    """The current X.509-SVID, ready for ``ssl.SSLContext.load_cert_chain``."""

    spiffe_id: str
    chain_pem: bytes
    key_pem: Secret
    fingerprint: str  # SHA-256 of the leaf certificate, hex: tokens bound to it are keyed by it
    expires_at: float  # epoch seconds

    def __repr__(self) -> str:
        return f"X509Material({self.spiffe_id!r}, fingerprint={self.fingerprint[:16]}…)"

    def client_context(self, ca_file: Path | None) -> ssl.SSLContext:
        """A TLS client context presenting this SVID (RFC 8705 mTLS). Reads files: off-loop."""
        context = client_context(ca_file)
        # load_cert_chain reads files only: a private directory that is removed at once.
        with tempfile.TemporaryDirectory(prefix="sidecar-svid-") as tmp:
            cert, key = Path(tmp) / "svid.pem", Path(tmp) / "svid-key.pem"
            cert.write_bytes(self.chain_pem)
            key.touch(mode=0o600)
            key.write_bytes(self.key_pem.reveal().encode())
            context.load_cert_chain(cert, key)
        return context


def _x509_material(context: Any) -> X509Material:
    svid = context.default_svid
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    leaf = svid.leaf
    return X509Material(
        spiffe_id=str(svid.spiffe_id),
        chain_pem=chain,
        key_pem=Secret(key.decode()),
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
        expires_at=leaf.not_valid_after_utc.timestamp(),
    )


class WorkloadIdentity:
    """The pod's identity, as the SPIRE agent (or any Workload API server) issues it."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.address = address
        self._timeout = timeout
        self._clock = clock
        self._client: Any = None
        self._jwt: dict[str, JwtSvid] = {}
        self._background = Background("identity")
        self._flights: SingleFlight[str, JwtSvid] = SingleFlight(self._background)
        self.state: State = "starting"
        self.spiffe_id: str | None = None
        self.last_error: str | None = None
        self.x509: X509Material | None = None
        self._x509_ready = asyncio.Event()
        self._x509_watch: Any = None
        self._x509_listeners: list[Callable[[X509Material], None]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    async def wait_until_ready(
        self,
        audience: str,
        *,
        x509: bool = False,
        max_delay: float = 30.0,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Fetch a first SVID, retrying with bounded exponential backoff until it arrives.

        Logs one line per state change, not per attempt: at pod start the agent socket may
        appear late and that is normal.
        """
        delay = 0.1
        while stop is None or not stop.is_set():
            try:
                await self.jwt_svid(audience)
                if x509:
                    await self.x509_svid()
                return
            except IdentityUnavailable:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                delay = min(delay * 2, max_delay)

    async def close(self) -> None:
        await self._background.close()
        watch, self._x509_watch = self._x509_watch, None
        if watch is not None:
            await asyncio.to_thread(watch.cancel)
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    async def settle(self) -> None:
        """Wait for JWT-SVID fetches in flight (background refreshes included)."""
        await self._flights.settle()

    def jwt_expiry(self) -> float | None:
        """Epoch seconds at which the soonest cached JWT-SVID expires (None: none cached)."""
        return min((s.expires_at for s in self._jwt.values()), default=None)

    # -- X.509-SVIDs ---------------------------------------------------------------------------

    def on_x509_rotation(self, listener: Callable[[X509Material], None]) -> None:
        self._x509_listeners.append(listener)

    async def x509_svid(self, *, timeout: float | None = None) -> X509Material:
        """The current X.509-SVID; the first call starts watching the Workload API stream."""
        if self.x509 is not None:
            return self.x509
        await self._watch_x509()
        try:
            await asyncio.wait_for(self._x509_ready.wait(), timeout or self._timeout)
        except TimeoutError as exc:
            raise IdentityUnavailable(
                "the SPIFFE Workload API did not deliver an X.509-SVID in time; is the SPIRE "
                "agent running and this workload registered?"
            ) from exc
        assert self.x509 is not None
        return self.x509

    async def _watch_x509(self) -> None:
        if self._x509_watch is not None:
            return
        try:
            client = await self._connect()
        except PySpiffeError as exc:
            self._set_state("waiting", exc)
            raise IdentityUnavailable(
                f"the SPIFFE Workload API is not reachable ({type(exc).__name__})"
            ) from exc
        loop = asyncio.get_running_loop()

        # Both callbacks run on the spiffe package's gRPC thread: hop to the loop.
        def on_success(context: Any) -> None:
            try:
                material = _x509_material(context)
            except Exception as exc:
                loop.call_soon_threadsafe(self._x509_failed, exc)
                return
            loop.call_soon_threadsafe(self._x509_arrived, material)

        def on_error(exc: Exception) -> None:
            loop.call_soon_threadsafe(self._x509_failed, exc)

        self._x509_watch = await asyncio.to_thread(
            client.stream_x509_contexts, on_success, on_error, True
        )

    def _x509_arrived(self, material: X509Material) -> None:
        previous, self.x509 = self.x509, material  # one assignment: readers see old or new
        self._x509_ready.set()
        self.spiffe_id = material.spiffe_id
        self._set_state("ready")
        if previous is not None and previous.fingerprint == material.fingerprint:
            return
        logging.getLogger("sidecar.audit").info(
            "X.509-SVID received" if previous is None else "X.509-SVID rotated",
            extra={
                "event": "svid_received" if previous is None else "svid_rotated",
                "spiffe_id": material.spiffe_id,
                "fingerprint": material.fingerprint[:16],
                "expires_at": int(material.expires_at),
            },
        )
        if previous is not None:
            for listener in self._x509_listeners:
                listener(material)

    def _x509_failed(self, exc: BaseException) -> None:
        """The spiffe watcher calls on_error only when it gives up: start a new one."""
        log.warning(
            "X.509-SVID stream ended; reconnecting",
            extra={"socket": self.address, "error": type(exc).__name__},
        )
        self._x509_watch = None
        self._background.spawn(self._rewatch_x509(), name="x509 re-watch")

    async def _rewatch_x509(self) -> None:
        delay = 0.5
        while self._x509_watch is None:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            try:
                await self._watch_x509()
            except IdentityUnavailable:
                delay = min(delay * 2, 30.0)

    # -- JWT-SVIDs -----------------------------------------------------------------------------

    async def jwt_svid(self, audience: str) -> JwtSvid:
        now = self._clock()
        cached = self._jwt.get(audience)
        if cached is not None and cached.usable(now):
            if now >= cached.refresh_at:
                self._flights.start(audience, self._fetch_jwt)  # refresh ahead, don't wait
            return cached
        return await self._flights.do(audience, self._fetch_jwt)

    async def _fetch_jwt(self, audience: str) -> JwtSvid:
        issued = self._clock()
        try:
            client = await self._connect()
            svid = await asyncio.to_thread(client.fetch_jwt_svid, audience={audience})
        except PySpiffeError as exc:
            self._set_state("unavailable" if self.state == "ready" else "waiting", exc)
            raise IdentityUnavailable(
                "the SPIFFE Workload API did not issue a JWT-SVID "
                f"({type(exc).__name__}); is the SPIRE agent running and this workload registered?"
            ) from exc
        result = JwtSvid(
            token=Secret(svid.token),
            spiffe_id=str(svid.spiffe_id),
            audience=audience,
            issued_at=issued,
            expires_at=float(svid.expiry),
        )
        self._jwt[audience] = result
        self.spiffe_id = result.spiffe_id
        self._set_state("ready")
        return result

    async def _connect(self) -> Any:
        if self._client is None:
            try:
                self._client = await asyncio.to_thread(
                    WorkloadApiClient, self.address, default_timeout=self._timeout
                )
            except ArgumentError as exc:
                raise _NoSocket(str(exc)) from exc
        return self._client

    def _set_state(self, state: State, error: Exception | None = None) -> None:
        if error is not None:
            self.last_error = type(error).__name__
        if state == self.state:
            return
        self.state = state
        if state == "ready":
            expiry = self.jwt_expiry() or (self.x509.expires_at if self.x509 else None)
            log.info(
                "SVID received",
                extra={
                    "spiffe_id": self.spiffe_id,
                    "socket": self.address,
                    "expires_at": int(expiry) if expiry else None,
                },
            )
        else:
            log.warning(
                "waiting for the SPIFFE Workload API" if state == "waiting" else "identity lost",
                extra={"socket": self.address, "error": self.last_error},
            )


class _NoSocket(ArgumentError):
    """The socket file does not exist (yet)."""
