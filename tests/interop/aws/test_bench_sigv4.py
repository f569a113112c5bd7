"""The bench's SigV4 configuration (bench/run.py, cell s) works: a real sidecar signs with
session credentials from the bench's STS stand-in (not timed here: `make bench` measures)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from bench.run import bench_sts, sigv4_config
from sidecar import config
from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.runtime import Sidecar
from tests.conftest import AppClient
from tests.credentials.test_kinds_static_header import recording_origin


async def test_the_bench_sigv4_cell_signs_every_request(stack: DevStack) -> None:
    async with bench_sts(stack) as (sts_url, calls), recording_origin(stack) as (url, seen):
        origin: Any = SimpleNamespace(url=url)
        doc = sigv4_config(stack, sts_url, origin)
        doc["destinations"][0]["allow_private"] = True
        async with Sidecar(config.parse(doc), grace=1.0) as sidecar, AppClient(sidecar) as app:
            for _ in range(3):
                status, _, body = await app.request("GET", f"http://{SAAS_HOST}/v1/invoices")
                assert status == 200, body
    assert len(calls) == 1  # one session for every request
    for request in seen:
        headers = {k.lower(): v for k, v in request["headers"]}
        assert headers[b"authorization"].startswith(
            b"AWS4-HMAC-SHA256 Credential=ASIABENCHEXAMPLE0000/"
        )
        assert headers[b"x-amz-security-token"] == b"benchSessionTokenEXAMPLE"
