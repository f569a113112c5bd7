"""The Workload API client: pyspiffe's, over a channel with gRPC's reconnect backoff bounded
(sidecar/credentials/workload_api.py). The real client against the dev Workload API (real gRPC,
unix socket); how fast the sidecar recovers after the agent was gone is measured by
`make chaos` (svid_expiry), not timed here."""

from __future__ import annotations

import inspect
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import spiffe

from sidecar.credentials.workload_api import CHANNEL_OPTIONS, WorkloadApiClient
from sidecar.devstack.pki import TrustDomain
from sidecar.devstack.workload_api import DevWorkloadApi

SPIFFE_ID = "spiffe://example.org/ns/billing/sa/legacy-invoicer"


@pytest.fixture
def agent() -> Iterator[DevWorkloadApi]:
    directory = Path(tempfile.mkdtemp(prefix="sidecar-wl-"))  # unix socket paths are short
    api = DevWorkloadApi(TrustDomain("example.org"), SPIFFE_ID, directory / "agent.sock")
    api.start()
    yield api
    api.stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_the_library_still_builds_its_channel_where_we_tune_it() -> None:
    # If a pyspiffe release renames the hook, the override would be silently unused: fail here.
    library = spiffe.WorkloadApiClient
    assert "_get_spiffe_grpc_channel" in vars(library)
    assert "self._get_spiffe_grpc_channel()" in inspect.getsource(library.__init__)
    assert "_get_spiffe_grpc_channel" in vars(WorkloadApiClient)
    options = dict(CHANNEL_OPTIONS)
    assert options["grpc.max_reconnect_backoff_ms"] <= 1000
    assert options["grpc.initial_reconnect_backoff_ms"] <= options["grpc.max_reconnect_backoff_ms"]


def test_the_tuned_client_speaks_to_the_agent_with_the_security_header(
    agent: DevWorkloadApi,
) -> None:
    # The dev agent refuses calls without the workload.spiffe.io header, as SPIRE does.
    client = WorkloadApiClient(agent.address, default_timeout=5.0)
    try:
        svid = client.fetch_x509_svid()
        assert str(svid.spiffe_id) == SPIFFE_ID
        jwt = client.fetch_jwt_svid(audience={"https://as.example"})
        assert str(jwt.spiffe_id) == SPIFFE_ID
    finally:
        client.close()
