"""The forwarder works with any kind of credential behind the seam (sidecar.credentials.kind).

A test-only HMAC kind stands in for what issue #20 adds (SigV4, static header secrets): it
needs the body's digest, signs what is actually sent, sets its own header lines and strips
the app's. Fakes at our own seam; the origin is a real TLS server on loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from aiohttp import web

from sidecar.credentials.kind import Answer, Credential
from sidecar.devstack.stack import DevStack
from sidecar.proxy.upstream import Forwarder
from sidecar.routing import Route
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, running_sidecar

KEY = b"test-only-hmac-key-0123456789abcdef"
HOST = "signed.example"


def signature(method: str, url: str, date: str, digest: str) -> str:
    text = f"{method}\n{url}\n{date}\n{digest}".encode()
    return hmac.new(KEY, text, hashlib.sha256).hexdigest()


class HmacKind:
    """Signs method, URL, a date header of its own and the body digest (SigV4's shape)."""

    strips = frozenset({"x-signature", "x-signed-date"})
    wants_body_digest = True

    def __init__(self) -> None:
        self.prepared = 0
        self.learnt: list[str] = []

    def ready(self, route: Route, scopes: tuple[str, ...]) -> str | None:
        return "key-1" if self.prepared else None

    async def prepare(self, route: Route, scopes: tuple[str, ...]) -> tuple[str, bool]:
        self.prepared += 1  # a real kind would fetch session credentials here
        return "key-1", False

    def reference(self, held: str) -> Mapping[str, Any]:
        return {"key_id": held}

    def header_lines(
        self,
        held: str,
        method: str,
        origin: str,
        path: str,
        query: str,
        headers: Sequence[tuple[str, str]],
        body_digest: str | None,
    ) -> str:
        digest = body_digest or "UNSIGNED-PAYLOAD"
        url = origin + path + (f"?{query}" if query else "")
        date = "20260101T000000Z"
        return (
            f"X-Signed-Date: {date}\r\nX-Key-Id: {held}\r\n"
            f"X-Signature: {signature(method, url, date, digest)}\r\n"
        )

    def learn(self, origin: str, answer: Answer) -> None:
        self.learnt.append(f"{origin} {answer.status}")

    def retry_reason(self, answer: Answer) -> str | None:
        return None

    async def again(self, held: str, route: Route, scopes: tuple[str, ...], reason: str) -> str:
        return held


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 65536):
        yield data[i : i + 65536]


def _typed(kind: HmacKind) -> Credential[Any]:
    return kind  # `mypy --strict` on this file checks the double against the protocol


@contextlib.asynccontextmanager
async def signed_origin(stack: DevStack) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": list(request.raw_headers),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        )
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tls = stack.ca.issue_server("127.0.0.1", "localhost")
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context())
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def with_kind(sidecar: Sidecar, kind: HmacKind) -> None:
    """Swap the forwarder for one whose routes all carry ``kind`` (the runtime's seam)."""
    old = sidecar.forwarder
    sidecar.forwarder = Forwarder(
        lambda route: _typed(kind),
        ssl_for=sidecar._route_ssl,
        replay_limit=sidecar.config.replay_buffer_bytes,
    )
    await old.close()


async def test_a_kind_that_signs_the_body_digest_and_sets_its_own_headers(
    stack: DevStack,
) -> None:
    kind = HmacKind()
    async with signed_origin(stack) as (upstream, seen):
        destination = {"host": HOST, "upstream": upstream}
        limits = {"replay_buffer_bytes": 4096}
        async with running_sidecar(stack, destination=destination, limits=limits) as sidecar:
            await with_kind(sidecar, kind)
            async with AppClient(sidecar) as app:
                body = json.dumps({"amount": 42}).encode()
                status, _, answer = await app.request(
                    "POST",
                    f"http://{HOST}/v1/invoices/7?x=1",
                    data=body,
                    headers={"X-Signature": "forged-by-the-app", "Authorization": "Bearer app"},
                )
                assert status == 200, answer
                status, _, _ = await app.request("GET", f"http://{HOST}/v1/invoices")
                assert status == 200
                # Streamed (larger than the replay buffer): no digest before it is sent.
                big = b"z" * (sidecar.config.replay_buffer_bytes + 1)
                status, _, _ = await app.request("PUT", f"http://{HOST}/big", data=chunks(big))
                assert status == 200
    post, get, put = seen
    headers = dict(post["headers"])
    assert post["path_qs"] == "/v1/invoices/7?x=1"
    assert post["sha256"] == hashlib.sha256(body).hexdigest()
    # The kind signed what was actually sent: method, URL, its date header, the body's digest.
    url = f"{upstream}/v1/invoices/7?x=1"
    expected = signature("POST", url, "20260101T000000Z", post["sha256"])
    assert headers[b"X-Signature"] == expected.encode()
    assert headers[b"X-Key-Id"] == b"key-1"
    # The app's copy of the kind's header was stripped, not sent beside ours.
    assert [v for k, v in post["headers"] if k.lower() == b"x-signature"] == [expected.encode()]
    # A kind that does not strip Authorization lets the app's through: stripping is the kind's.
    assert headers[b"Authorization"] == b"Bearer app"
    # A bodiless GET: the digest of the empty body, and the cached credential (no second fetch).
    empty = hashlib.sha256(b"").hexdigest()
    expected = signature("GET", f"{upstream}/v1/invoices", "20260101T000000Z", empty)
    assert dict(get["headers"])[b"X-Signature"] == expected.encode()
    expected = signature("PUT", f"{upstream}/big", "20260101T000000Z", "UNSIGNED-PAYLOAD")
    assert dict(put["headers"])[b"X-Signature"] == expected.encode()
    assert put["sha256"] == hashlib.sha256(big).hexdigest()
    assert kind.prepared == 1
    assert kind.learnt == [f"{upstream} 200"] * 3
    assert stack.auth_server.token_requests == []  # no OAuth token for this kind
