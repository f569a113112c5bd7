"""DEVELOPMENT ONLY: `sidecar demo` — the product end to end on the dev stack.

Starts the dev stack and the sidecar, then behaves like a legacy app: plain ``http://`` URLs
through ``HTTP_PROXY``. Prints a short trace per request built from what the peers saw: never a
token, proof or key, only claims and outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import sys
from typing import Any

import aiohttp

from sidecar import config
from sidecar.devstack.stack import SAAS_HOST, DevStack, dev_stack
from sidecar.runtime import Sidecar


def _say(text: str = "") -> None:
    print(text, flush=True)


async def run_demo(*, serve: bool = False) -> int:
    async with dev_stack() as stack:
        cfg = config.parse(stack.sidecar_config())
        async with Sidecar(cfg, grace=2.0) as sidecar:
            assert sidecar.proxy_address is not None
            proxy = f"http://{sidecar.proxy_address}"
            _say("sidecar demo — development stack on loopback (nothing here is for production)")
            _say(f"  Workload API   {stack.workload_api.address}  (SPIFFE ID {stack.spiffe_id})")
            _say(f"  auth server    {stack.auth_server.issuer}")
            _say(f"  SaaS API       {stack.saas.base_url}  (the app calls it http://{SAAS_HOST})")
            _say(f"  sidecar        HTTP_PROXY={proxy}  admin http://{sidecar.admin_address}")
            _say()
            get_url = f"http://{SAAS_HOST}/v1/invoices?limit=2"
            ok = await _exchange(stack, sidecar, proxy, "GET", get_url)
            body = json.dumps({"customer": "ACME", "amount": 1200}).encode()
            post_url = f"http://{SAAS_HOST}/v1/invoices"
            ok &= await _exchange(stack, sidecar, proxy, "POST", post_url, body)
            if serve:
                await _serve_forever(stack, proxy)
            return 0 if ok else 1


async def _exchange(
    stack: DevStack,
    sidecar: Sidecar,
    proxy: str,
    method: str,
    url: str,
    body: bytes | None = None,
) -> bool:
    tokens_before = len(stack.auth_server.token_requests)
    seen_before = len(stack.saas.requests)
    headers = {"Content-Type": "application/json"} if body else {}
    async with (
        aiohttp.ClientSession() as app,
        app.request(method, url, data=body, headers=headers, proxy=proxy) as resp,
    ):
        answer = await resp.read()
    _say(f"{method} {url}")
    assert sidecar.snapshot is not None
    resolved = sidecar.snapshot.routing.resolve(method, url)  # what the sidecar chose, and why
    upstream = resolved.route.upstream_origin(resolved.target)
    scopes = " ".join(resolved.scopes)
    _say(f"  route          {resolved.route.name} -> {upstream}  scopes asked: {scopes}")
    _say(f"  app got        HTTP {resp.status} {_short(answer)}")
    new_tokens = stack.auth_server.token_requests[tokens_before:]
    for record in new_tokens:
        _say(
            f"  token request  grant={record.grant_type} auth={record.auth_method} "
            f"scope={' '.join(record.scope)} -> HTTP {record.status}"
        )
    if not new_tokens:
        _say("  token          served from the sidecar's cache")
    for seen in stack.saas.requests[seen_before:]:
        claims: dict[str, Any] = dict(seen.token_claims or {})
        proof: dict[str, Any] = dict(seen.proof_claims or {})
        _say(f"  SaaS saw       {seen.method} {seen.raw_path} -> HTTP {seen.status}")
        _say(f"    SPIFFE ID    {claims.get('sub')}")
        _say(
            f"    token        aud={claims.get('aud')} scope={claims.get('scope')} "
            f"exp={claims.get('exp')} cnf.jkt={claims.get('cnf', {}).get('jkt')}"
        )
        _say(
            f"    DPoP proof   htm={proof.get('htm')} htu={proof.get('htu')} "
            f"ath={'present' if proof.get('ath') else 'missing'}"
        )
        if body is not None:
            match = seen.body_sha256 == hashlib.sha256(body).hexdigest()
            verdict = "matches" if match else "DIFFERS"
            _say(f"    body         {seen.body_len} bytes, sha256 {verdict}")
    _say()
    return resp.status == 200


def _short(answer: bytes, limit: int = 100) -> str:
    text = answer.decode(errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "…"


async def _serve_forever(stack: DevStack, proxy: str) -> None:
    _say("The stack stays up. In another shell:")
    _say(f"  export HTTP_PROXY={proxy} http_proxy={proxy}")
    _say(f"  curl -s http://{SAAS_HOST}/v1/invoices")
    _say(
        f"  curl -s -X POST -H 'Content-Type: application/json' -d '{{\"amount\": 5}}' "
        f"http://{SAAS_HOST}/v1/invoices/42"
    )
    _say("Ctrl-C to stop.")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    sys.stdout.flush()
