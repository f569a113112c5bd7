"""The SPIFFE Workload API client: pyspiffe's, over a gRPC channel whose reconnect backoff is
bounded for a local socket.

gRPC backs off reconnects with its defaults (1 s, times 1.6 per failure, up to 120 s, ±20%
jitter) and, while a backoff runs, fails every call at once without trying the socket. After
the SPIRE agent was gone 12 s, the first call that could succeed came 3-6 s after the agent was
back; after minutes, up to two minutes later, whatever the identity module's own retry
schedule said. The agent is a unix socket in the same pod: trying it again is cheap, so the
channel backs off from 0.2 s to at most 1 s, and the identity module's schedule
(:func:`sidecar.credentials.identity.rewatch_delay`) is what decides how often it is asked.
"""

from __future__ import annotations

import grpc
from spiffe import WorkloadApiClient as _PySpiffeClient
from spiffe.workloadapi.grpc import header_manipulator_client_interceptor
from spiffe.workloadapi.workload_api_client import (
    WORKLOAD_API_HEADER_KEY,
    WORKLOAD_API_HEADER_VALUE,
)

# gRPC channel arguments (grpc/include/grpc/impl/channel_arg_names.h).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class WorkloadApiClient(_PySpiffeClient):
    """pyspiffe's client with :data:`CHANNEL_OPTIONS` on its channel (the same target, the
    same ``workload.spiffe.io`` security header the library adds)."""

    def _get_spiffe_grpc_channel(self) -> grpc.Channel:
        target = self._grpc_target(self._config.spiffe_endpoint_socket)
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        header = header_manipulator_client_interceptor.header_adder_interceptor(
            WORKLOAD_API_HEADER_KEY, WORKLOAD_API_HEADER_VALUE
        )
        return grpc.intercept_channel(channel, header)
