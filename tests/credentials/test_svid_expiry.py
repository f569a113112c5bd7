"""#16.3 through the real sidecar: with the Workload API gone past the X.509-SVID's notAfter,
the SVID is no longer presented; the app gets 503 identity_unavailable with Retry-After, and
/readyz and a log line say why."""

from __future__ import annotations

import json
import time

from sidecar import config
from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, LogCapture
from tests.ops.test_admin import admin_get

URL = f"http://{SAAS_HOST}/v1/invoices"


class WallClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_an_expired_x509_svid_gives_identity_unavailable(
    stack: DevStack, logs: LogCapture
) -> None:
    wall = WallClock()
    cfg = config.parse(stack.sidecar_config(authorization_server={"client_auth": "mtls"}))
    async with Sidecar(cfg, grace=5.0, wall_clock=wall) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        held = sidecar.identity.held_x509
        assert held is not None
        stack.workload_api.set_available(False)
        asked = len(stack.auth_server.token_requests)
        wall.now = held.expires_at + 1
        sidecar.credentials.cache.clear()  # a token request is needed now
        status, headers, body = await app.request("GET", URL)
        assert status == 503, body
        assert json.loads(body)["error"] == "identity_unavailable"
        assert int(headers["Retry-After"]) >= 1
        assert len(stack.auth_server.token_requests) == asked  # the expired SVID never went out
        status, ready = await admin_get(sidecar, "/readyz")
        assert status == 503
        assert ready["identity"] == "expired"
        assert "expired" in ready["problems"]["identity"]
        metrics = (await admin_get(sidecar, "/metrics"))[1]
        assert 'sidecar_svid_expiry_seconds{type="x509"} -1.0' in metrics  # still reported
    assert any(r.getMessage() == "X.509-SVID expired; not presenting it" for r in logs.records)
