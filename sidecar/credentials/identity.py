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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from spiffe import WorkloadApiClient
from spiffe.errors import ArgumentError, PySpiffeError

from sidecar.errors import IdentityUnavailable
from sidecar.secret import Secret
from sidecar.tasks import Background, SingleFlight

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

    # -- lifecycle -----------------------------------------------------------------------------

    async def wait_until_ready(
        self, audience: str, *, max_delay: float = 30.0, stop: asyncio.Event | None = None
    ) -> None:
        """Fetch a first SVID, retrying with bounded exponential backoff until it arrives.

        Logs one line per state change, not per attempt: at pod start the agent socket may
        appear late and that is normal.
        """
        delay = 0.1
        while stop is None or not stop.is_set():
            try:
                await self.jwt_svid(audience)
                return
            except IdentityUnavailable:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                delay = min(delay * 2, max_delay)

    async def close(self) -> None:
        await self._background.close()
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

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
            log.info("SVID received", extra={"spiffe_id": self.spiffe_id, "socket": self.address})
        else:
            log.warning(
                "waiting for the SPIFFE Workload API" if state == "waiting" else "identity lost",
                extra={"socket": self.address, "error": self.last_error},
            )


class _NoSocket(ArgumentError):
    """The socket file does not exist (yet)."""
