"""Micro-benchmarks of the per-request pure code, each next to a baseline measured in the same
run (the ratio is the result; absolute times vary with the machine):

  dpop proof     DpopKey.proof (ath, nonce)      vs pyjwt.encode of the same proof
                                                 and a bare P-256 sign (the floor)
  routing        RoutingTable.resolve, 50 routes vs a dict lookup of the host
  htu            dpop.htu                        vs an f-string of the same parts
  cache lookup   TokenCache.lookup (a hit)       vs a dict get
  audit line     Exchange.record through logs    vs json.dumps + write + flush of the same
                 .configure() (to /dev/null)        fields (the floor of a JSON line)
  header names   the listener's on_header, 8     vs the same with the '_' looked for in the
                 headers (the check on the          bytes (``b"_" in name``, before: the
                 decoded name)                      operand is first tried as an int)

    python -m bench.micro [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar import config
from sidecar.credentials.dpop import DpopKey, access_token_hash, b64url, htu
from sidecar.credentials.token_cache import TokenCache
from sidecar.credentials.token_client import AccessToken, TokenKey
from sidecar.ops import logs
from sidecar.ops.audit import Exchange
from sidecar.routing import RoutingTable
from sidecar.secret import Secret
from sidecar.tasks import Background

TOKEN = "eyJhbGciOiJFUzI1NiJ9." + "a" * 400 + ".sig"
URL = "https://api.vendor.example/v1/invoices/123"


def per_call(fn: Callable[[], Any], seconds: float) -> float:
    """Microseconds per call: the best of 5 repeats of a loop sized to take ``seconds``/5."""
    timer = timeit.Timer(fn)
    if seconds < 0.1:  # a smoke run: no calibration
        return timer.timeit(number=20) / 20 * 1e6
    number, _ = timer.autorange()
    per_repeat = max(1, int(number * (seconds / 5) / 0.2))
    return min(timer.repeat(repeat=5, number=per_repeat)) / per_repeat * 1e6


def bench_dpop(seconds: float) -> list[tuple[str, float]]:
    key = DpopKey()
    private = key._key
    ath = access_token_hash(TOKEN)

    def ours() -> None:
        key.proof("GET", URL, ath=ath, nonce="server-nonce-value")

    def with_pyjwt() -> None:
        jwt.encode(
            {
                "jti": b64url(b"0123456789abcdef"),
                "htm": "GET",
                "htu": URL,
                "iat": int(time.time()),
                "ath": ath,
                "nonce": "server-nonce-value",
            },
            private,
            algorithm="ES256",
            headers={"typ": "dpop+jwt", "jwk": key.public_jwk},
        )

    def bare_sign() -> None:
        private.sign(b"x" * 300, ec.ECDSA(hashes.SHA256()))

    return [
        ("dpop proof (ours)", per_call(ours, seconds)),
        ("dpop proof (pyjwt baseline)", per_call(with_pyjwt, seconds)),
        ("bare P-256 sign (floor)", per_call(bare_sign, seconds)),
    ]


def _config(routes: int) -> config.Config:
    destinations = [
        {
            "name": f"api{i}",
            "host": f"api{i}.vendor.example",
            "upstream": f"https://api{i}.vendor.example",
            "authorization_server": "corp",
            "resource": f"https://api{i}.vendor.example",
            "scopes": {
                "default": ["read"],
                "rules": [
                    {"methods": ["GET"], "paths": ["/v1/reports/**"], "scopes": ["reports"]},
                    {"methods": ["POST", "PUT"], "paths": ["/v1/invoices/**"], "scopes": ["write"]},
                    {"methods": ["DELETE"], "paths": ["/v1/**"], "scopes": ["admin"]},
                ],
            },
        }
        for i in range(routes)
    ]
    doc = {
        "spiffe": {"socket": "unix:///run/spire/agent.sock"},
        "authorization_servers": {"corp": {"issuer": "https://as.example"}},
        "destinations": destinations,
    }
    return config.parse(doc)


def bench_routing(seconds: float) -> list[tuple[str, float]]:
    table = RoutingTable(_config(50))
    hosts = {f"api{i}.vendor.example": i for i in range(50)}
    target = "http://api37.vendor.example/v1/invoices/123?expand=lines"

    def ours() -> None:
        table.resolve("POST", target)

    def baseline() -> None:
        hosts.get("api37.vendor.example")

    return [
        ("routing resolve, 50 routes (ours)", per_call(ours, seconds)),
        ("dict lookup of the host (baseline)", per_call(baseline, seconds)),
    ]


def bench_htu(seconds: float) -> list[tuple[str, float]]:
    def ours() -> None:
        htu("https", "API.Vendor.Example", 443, "/v1/invoices/123?x=1")

    parts = ("https", "api.vendor.example", "/v1/invoices/123")

    def baseline() -> None:
        scheme, host, path = parts
        _ = f"{scheme}://{host}{path}"

    return [
        ("htu normalisation (ours)", per_call(ours, seconds)),
        ("f-string of the parts (baseline)", per_call(baseline, seconds)),
    ]


def bench_cache(seconds: float) -> list[tuple[str, float]]:
    loop = asyncio.new_event_loop()
    background = Background("bench")
    cache = TokenCache(background, clock=lambda: 1000.0)
    key = TokenKey(
        server="corp",
        client_id="spiffe://example.org/app",
        grant="client_credentials",
        resource="https://api.vendor.example",
        audience=None,
        scopes=("read",),
        jkt="thumbprint",
    )
    token = AccessToken(Secret(TOKEN), "DPoP", 900.0, 4600.0, ("read",))

    async def fetch(_: TokenKey) -> AccessToken:
        return token

    loop.run_until_complete(cache.lookup(key, fetch))  # now a hit
    plain = {key: token}
    batch = 1000

    async def ours_batch() -> None:
        for _ in range(batch):
            await cache.lookup(key, fetch)

    def ours() -> None:
        loop.run_until_complete(ours_batch())

    def baseline() -> None:
        for _ in range(batch):
            plain.get(key)

    result = [
        ("token cache lookup, hit (ours)", per_call(ours, seconds) / batch),
        ("dict get (baseline)", per_call(baseline, seconds) / batch),
    ]
    loop.close()
    return result


def bench_audit(seconds: float) -> list[tuple[str, float]]:
    sink = open(os.devnull, "w")  # noqa: SIM115 - closed below, after the handler goes
    saved = sys.stderr, logging.getLogger().handlers[:], logging.getLogger().level
    sys.stderr = sink
    try:
        logs.configure("warning", "json", audit=True)

        def ours() -> None:
            exchange = Exchange("GET", URL)
            exchange.route, exchange.host = "vendor", "api.vendor.example"
            exchange.path, exchange.scopes = "/v1/invoices/123", ("invoices:read",)
            exchange.status, exchange.cache = 200, "hit"
            exchange.token = {"sub": "spiffe://example.org/app", "jti": "0123456789abcdef"}
            exchange.record("spiffe://example.org/app", with_query=False)

        doc = {
            "time": "2026-12-02T10:00:00.000Z",
            "level": "info",
            "logger": "sidecar.audit",
            "msg": "request",
            "event": "request",
            "spiffe_id": "spiffe://example.org/app",
            "route": "vendor",
            "method": "GET",
            "host": "api.vendor.example",
            "path": "/v1/invoices/123",
            "scopes": "invoices:read",
            "status": 200,
            "latency_ms": 0.01,
            "cache": "hit",
            "token_sub": "spiffe://example.org/app",
            "token_jti": "0123456789abcdef",
        }

        def floor() -> None:
            sink.write(json.dumps(doc) + "\n")
            sink.flush()

        return [
            ("audit line per request (ours)", per_call(ours, seconds)),
            ("json.dumps + write + flush (floor)", per_call(floor, seconds)),
        ]
    finally:
        sys.stderr = saved[0]
        root = logging.getLogger()
        root.handlers[:], _ = saved[1], root.setLevel(saved[2])
        with contextlib.suppress(OSError):
            sink.close()


def bench_header_names(seconds: float) -> list[tuple[str, float]]:
    from sidecar.proxy.listener import Listener, _Connection

    headers = [
        (b"Host", b"api.vendor.example"),
        (b"User-Agent", b"legacy-app/1.0"),
        (b"Accept", b"application/json"),
        (b"Accept-Encoding", b"gzip"),
        (b"Content-Type", b"application/json"),
        (b"X-Request-Id", b"0123456789abcdef"),
        (b"Traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        (b"Connection", b"keep-alive"),
    ]
    listener = Listener(lambda request, reply: asyncio.sleep(0), max_header_bytes=65536)
    conn = _Connection(listener, 0)  # never connected: only its parser callbacks are called
    conn._in_head = True

    def ours() -> None:
        conn._headers, conn._head_bytes = [], 0
        for name, value in headers:
            conn.on_header(name, value)

    def before() -> None:  # the check as it was: on the bytes, then the size count by a call
        conn._headers, conn._head_bytes = [], 0
        for name, value in headers:
            if b"_" in name:
                raise ValueError
            conn._headers.append(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            )
            conn._count(len(name) + len(value) + 4)

    return [
        ("listener header names, 8 headers (ours)", per_call(ours, seconds)),
        ("the same, '_' looked for in bytes (before)", per_call(before, seconds)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args(argv)
    print("| operation | µs per call | × baseline |")
    print("|---|---|---|")
    groups = (bench_dpop, bench_routing, bench_htu, bench_cache, bench_audit, bench_header_names)
    for group in groups:
        rows = group(args.seconds)
        baseline = rows[1][1]
        for name, micros in rows:
            print(f"| {name} | {micros:.2f} | {micros / baseline:.2f} |")
    return 0
