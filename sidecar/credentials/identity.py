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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes, serialization
from spiffe.errors import ArgumentError, PySpiffeError

from sidecar.credentials.workload_api import WorkloadApiClient
from sidecar.errors import IdentityUnavailable
from sidecar.secret import Secret
from sidecar.tasks import Background, SingleFlight
from sidecar.tls import client_context

log = logging.getLogger("sidecar.identity")

State = Literal["starting", "waiting", "ready", "unavailable", "expired"]
RETRY_AFTER = 2  # seconds, on 503 identity_unavailable: the agent usually answers again soon
REWATCH_MAX = 30.0  # X.509 stream reconnects while a usable SVID is held
REWATCH_SHORT_MAX = 2.0  # ... and while none is (expired or never had): recover fast


def rewatch_delay(previous: float, *, holding_usable: bool) -> float:
    """The next wait before reconnecting the X.509 stream: doubling, capped. A reconnect to the
    agent's local socket is cheap, so while no usable X.509-SVID is held the cap is short (as
    token fetches do without a usable token): the route recovers within seconds of the agent's
    return, not after a 30 s backoff."""
    return min(previous * 2, REWATCH_MAX if holding_usable else REWATCH_SHORT_MAX)


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
        self.held_x509: X509Material | None = None  # the latest delivered, expired or not
        self._expired_logged: str | None = None  # fingerprint whose expiry was logged
        self._expiry_timer: asyncio.Task[None] | None = None
        # Counted when they happen (sidecar_workload_api_events_total), not when used later.
        self.events: dict[str, int] = {
            "stream_broken": 0,
            "reconnect_attempt": 0,
            "fetch_failed": 0,
            "svid_expired": 0,
        }
        self._closed = False
        self._streams: list[Any] = []  # every X.509 stream started (cancelled on close)
        self._streams_lock = threading.Lock()
        self._stream_delivered = False  # the current stream delivered an SVID
        self._rewatch_delay = 0.5
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
        self._closed = True
        await self._background.close()
        self._x509_watch = None
        # Every stream ever started is cancelled, even one whose starter was cancelled before
        # it got the handle: none may outlive the client (gRPC would crash on its channel).
        await asyncio.to_thread(self._cancel_streams)
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    async def settle(self) -> None:
        """Wait for JWT-SVID fetches in flight (background refreshes included)."""
        await self._flights.settle()

    def jwt_expiry(self) -> float | None:
        """Epoch seconds at which the freshest cached JWT-SVID expires (None: none cached).
        JWT-SVIDs are fetched when a token request needs one, so this may be past between
        token requests: the X.509-SVID's expiry is the one that says the agent is rotating."""
        return max((s.expires_at for s in self._jwt.values()), default=None)

    @property
    def x509(self) -> X509Material | None:
        """The current X.509-SVID if it is valid now: never one past its ``notAfter``."""
        held = self.held_x509
        if held is None:
            return None
        if self._clock() < held.expires_at:
            return held
        self._expired(held)
        return None

    def problem(self, *, need_x509: bool) -> tuple[str, str] | None:
        """(state, reason) when the identity cannot be used now, else None (for readiness)."""
        held = self.held_x509
        # Reading x509 logs and counts an expiry once, whatever the client auth; only routes
        # that present it (mtls) make the identity unusable.
        if held is not None and self.x509 is None and need_x509:
            return "expired", (
                f"the X.509-SVID expired at {_utc(held.expires_at)} and the Workload API at "
                f"{self.address} has not delivered a new one"
            )
        if need_x509 and held is None:
            return "waiting", f"no X.509-SVID from the Workload API at {self.address} yet"
        if self.state in ("ready", "expired"):
            return None
        return self.state, (
            f"no SVID from the Workload API at {self.address} "
            f"({self.last_error or 'not fetched yet'})"
        )

    def _expired(self, held: X509Material) -> None:
        """Once per SVID: say why it is no longer presented."""
        if self._expired_logged == held.fingerprint:
            return
        self._expired_logged = held.fingerprint
        self.events["svid_expired"] += 1
        self.state = "expired"
        log.warning(
            "X.509-SVID expired; not presenting it",
            extra={
                "socket": self.address,
                "spiffe_id": held.spiffe_id,
                "fingerprint": held.fingerprint[:16],
                "expired_at": int(held.expires_at),
            },
        )

    # -- X.509-SVIDs ---------------------------------------------------------------------------

    def on_x509_rotation(self, listener: Callable[[X509Material], None]) -> None:
        self._x509_listeners.append(listener)

    async def x509_svid(self, *, timeout: float | None = None) -> X509Material:
        """The current X.509-SVID; the first call starts watching the Workload API stream."""
        if self.x509 is not None:
            return self.x509
        if self.held_x509 is not None:  # delivered, but past its notAfter
            raise IdentityUnavailable(
                "the X.509-SVID expired and the SPIFFE Workload API has not delivered a new "
                "one; is the SPIRE agent running?",
                retry_after=RETRY_AFTER,
            )
        await self._watch_x509()
        try:
            await asyncio.wait_for(self._x509_ready.wait(), timeout or self._timeout)
        except TimeoutError as exc:
            raise IdentityUnavailable(
                "the SPIFFE Workload API did not deliver an X.509-SVID in time; is the SPIRE "
                "agent running and this workload registered?",
                retry_after=RETRY_AFTER,
            ) from exc
        current = self.x509
        if current is None:
            raise IdentityUnavailable(
                "the SPIFFE Workload API delivered an X.509-SVID that has already expired",
                retry_after=RETRY_AFTER,
            )
        return current

    async def watch_x509(self) -> None:
        """Follow the X.509-SVID stream without waiting for it (whatever the client auth:
        its expiry and the stream's breaks are reported even when no AS uses mTLS)."""
        try:
            await self._watch_x509()
        except IdentityUnavailable:
            self._background.spawn(self._rewatch_x509(), name="x509 re-watch")

    async def _watch_x509(self) -> None:
        if self._x509_watch is not None:
            return
        try:
            client = await self._connect()
        except PySpiffeError as exc:
            self._set_state("waiting", exc)
            raise IdentityUnavailable(
                f"the SPIFFE Workload API is not reachable ({type(exc).__name__})",
                retry_after=RETRY_AFTER,
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

        # retry_connect=False: the package then reports every break (it retries silently
        # otherwise); _rewatch_x509 reconnects, so a break is logged and counted when it
        # happens.
        def start() -> Any:  # on a worker thread
            with self._streams_lock:
                if self._closed:
                    return None
                handle = client.stream_x509_contexts(on_success, on_error, False)
                self._streams.append(handle)
                while len(self._streams) > 4:  # older ones broke (one stream at a time)
                    self._streams.pop(0).cancel()
                return handle

        self._x509_watch = _STARTING
        handle = await asyncio.to_thread(start)
        if handle is not None and self._x509_watch is _STARTING:
            self._x509_watch = handle
        elif handle is not None:  # it broke before the handle arrived: a re-watch took over
            await asyncio.to_thread(handle.cancel)

    def _cancel_streams(self) -> None:
        with self._streams_lock:
            streams, self._streams = self._streams, []
        for handle in streams:
            handle.cancel()

    def _x509_arrived(self, material: X509Material) -> None:
        previous, self.held_x509 = self.held_x509, material  # one assignment: old or new
        self._x509_ready.set()
        self._stream_delivered = True
        if previous is None or previous.fingerprint != material.fingerprint:
            self._arm_expiry(material)
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

    def _arm_expiry(self, material: X509Material) -> None:
        """A timer at the SVID's notAfter: its expiry is logged when it happens."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()

        async def at_expiry() -> None:
            await asyncio.sleep(max(0.0, material.expires_at - self._clock()))
            if self.held_x509 is material:
                _ = self.x509  # logs and counts the expiry

        self._expiry_timer = self._background.spawn(at_expiry(), name="x509 expiry")

    def _x509_failed(self, exc: BaseException) -> None:
        """The stream broke (the agent went away or restarted): say so now, reconnect."""
        if self._closed or self._x509_watch is None:
            return  # closed, or a re-watch is already under way
        if self._stream_delivered:  # it was working: the agent went away now
            self.events["stream_broken"] += 1
            self._rewatch_delay = 0.5
            log.warning(
                "Workload API stream broken; reconnecting",
                extra={"socket": self.address, "error": type(exc).__name__},
            )
        else:  # a reconnect that failed: back off (bounded), no new warning
            self._rewatch_delay = rewatch_delay(
                self._rewatch_delay, holding_usable=self.x509 is not None
            )
            log.debug("Workload API reconnect failed", extra={"error": type(exc).__name__})
        self._stream_delivered = False
        self._x509_watch = None
        self._background.spawn(self._rewatch_x509(), name="x509 re-watch")

    async def _rewatch_x509(self) -> None:
        while self._x509_watch is None:
            delay = self._rewatch_delay
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            self.events["reconnect_attempt"] += 1
            try:
                await self._watch_x509()
            except IdentityUnavailable:
                self._rewatch_delay = rewatch_delay(delay, holding_usable=self.x509 is not None)

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
            self.events["fetch_failed"] += 1
            self._set_state("unavailable" if self.state == "ready" else "waiting", exc)
            raise IdentityUnavailable(
                "the SPIFFE Workload API did not issue a JWT-SVID "
                f"({type(exc).__name__}); is the SPIRE agent running and this workload registered?",
                retry_after=RETRY_AFTER,
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
            held = self.held_x509
            expiry = self.jwt_expiry() or (held.expires_at if held else None)
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


_STARTING: Any = object()  # the watch is being set up (its handle not returned yet)


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class _NoSocket(ArgumentError):
    """The socket file does not exist (yet)."""
