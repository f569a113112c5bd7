"""DEVELOPMENT ONLY: a SPIFFE Workload API server on a unix socket.

It speaks the real gRPC protocol with the stubs the ``spiffe`` wheel ships, so the sidecar's
real client talks to it exactly as it would to a SPIRE agent. One workload, one SPIFFE ID.
Like the agent, it refuses calls without the ``workload.spiffe.io: true`` metadata.

The tests drive it: ``rotate_x509`` pushes a new X.509-SVID to every open stream,
``set_available(False)`` makes every call fail UNAVAILABLE (agent down).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc

from sidecar.devstack.pki import TrustDomain, X509SvidMaterial

_HEADER = ("workload.spiffe.io", "true")


class DevWorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(
        self,
        trust_domain: TrustDomain,
        spiffe_id: str,
        socket_path: Path,
        *,
        jwt_ttl: float = 300.0,
        x509_ttl: float = 3600.0,
    ) -> None:
        self.trust_domain = trust_domain
        self.spiffe_id = spiffe_id
        self.socket_path = Path(socket_path)
        self.jwt_ttl = jwt_ttl
        self.x509_ttl = dt.timedelta(seconds=x509_ttl)  # short: SVIDs that expire during a test
        self.jwt_svids_issued: list[str] = []
        self.jwt_svid_requests: list[tuple[str, ...]] = []  # audiences asked, in order
        self._x509 = trust_domain.issue_x509_svid(spiffe_id, self.x509_ttl)
        self._available = True
        self.refused = 0  # calls turned away while unavailable
        self._changed = threading.Condition()
        self._version = 0
        self._stopping = False
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def x509_svid(self) -> X509SvidMaterial:
        return self._x509

    # -- control (from tests and the demo) ----------------------------------------------------
    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="wlapi"))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(self.address)
        server.start()
        self._server = server

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def rotate_x509(self) -> X509SvidMaterial:
        with self._changed:
            self._x509 = self.trust_domain.issue_x509_svid(self.spiffe_id, self.x509_ttl)
            self._version += 1
            self._changed.notify_all()
        return self._x509

    def set_available(self, available: bool) -> None:
        with self._changed:
            self._available = available
            self._version += 1
            self._changed.notify_all()

    def wait_refused(self, count: int, timeout: float = 10.0) -> bool:
        """Block (in a thread) until ``count`` calls were turned away while unavailable."""
        with self._changed:
            return self._changed.wait_for(lambda: self.refused >= count, timeout)

    # -- the Workload API ---------------------------------------------------------------------
    def _admit(self, context: grpc.ServicerContext) -> None:
        if _HEADER not in tuple(context.invocation_metadata() or ()):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        if not self._available:
            with self._changed:
                self.refused += 1
                self._changed.notify_all()
            context.abort(grpc.StatusCode.UNAVAILABLE, "agent unavailable (dev stack)")

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit(context)
        audiences = tuple(request.audience)
        self.jwt_svid_requests.append(audiences)
        if not audiences:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if request.spiffe_id and request.spiffe_id != self.spiffe_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        token = self.trust_domain.issue_jwt_svid(self.spiffe_id, audiences, ttl=self.jwt_ttl)
        self.jwt_svids_issued.append(token)
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id=self.spiffe_id, svid=token)]
        )

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._admit(context)
        yield workload_pb2.JWTBundlesResponse(
            bundles={f"spiffe://{self.trust_domain.name}": self.trust_domain.jwks_bytes()}
        )
        self._wait_while_open(context, None)

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._admit(context)
        version: int | None = -1
        while True:
            if version == self._version:
                version = self._wait_while_open(context, version)
                if version is None:
                    return
            with self._changed:
                version = self._version
                available, svid = self._available, self._x509
            if not available:
                context.abort(grpc.StatusCode.UNAVAILABLE, "agent unavailable (dev stack)")
            yield self._x509_response(svid)

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._admit(context)
        yield workload_pb2.X509BundlesResponse(
            bundles={f"spiffe://{self.trust_domain.name}": self.trust_domain.x509_bundle_der}
        )
        self._wait_while_open(context, None)

    def _x509_response(self, svid: X509SvidMaterial) -> Any:
        return workload_pb2.X509SVIDResponse(
            svids=[
                workload_pb2.X509SVID(
                    spiffe_id=svid.spiffe_id,
                    x509_svid=svid.chain_der,
                    x509_svid_key=svid.key_der,
                    bundle=self.trust_domain.x509_bundle_der,
                )
            ]
        )

    def _wait_while_open(self, context: grpc.ServicerContext, version: int | None) -> int | None:
        """Block the stream until the state changes (returns the new version) or it ends."""
        with self._changed:
            while not self._stopping and context.is_active():
                if version is not None and self._version != version:
                    return self._version
                self._changed.wait(timeout=0.5)  # re-check is_active: the client may have left
        return None
