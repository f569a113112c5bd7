"""Fallback load generator when wrk is not installed: same JSON summary, far less capable.

    python -m bench.load URL [--proxy P] [--host H] [--connections N] [--duration S] [--delay-ms D]
                             [--cafile F]

An ``https://`` URL with ``--proxy`` is sent as the app would: CONNECT, then TLS verified
against ``--cafile`` (the sidecar's pod CA, for the intercepted configuration).

Runs in its own process (its CPU is not the proxy's). A Python client saturates long before a
fast proxy does, so saturation numbers from it understate the proxy; the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time

import aiohttp


async def run(args: argparse.Namespace) -> dict[str, int]:
    latencies: list[float] = []
    errors = {"socket": 0, "status": 0}
    deadline = time.monotonic() + args.duration
    tls: ssl.SSLContext | bool = False
    if args.cafile:
        tls = ssl.create_default_context(cafile=args.cafile)
    connector = aiohttp.TCPConnector(limit=args.connections, ssl=tls)

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                async with session.get(
                    args.url, proxy=args.proxy or None, headers={"Accept": "application/json"}
                ) as resp:
                    await resp.read()
                    if resp.status >= 400:
                        errors["status"] += 1
            except (aiohttp.ClientError, OSError):
                errors["socket"] += 1
            latencies.append(time.perf_counter() - start)
            if args.delay_ms:
                await asyncio.sleep(args.delay_ms / 1000)

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(args.connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> int:
        return int(latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1e6)

    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "socket_errors": errors["socket"],
        "status_errors": errors["status"],
        "p50_us": pct(0.50) if latencies else 0,
        "p90_us": pct(0.90) if latencies else 0,
        "p99_us": pct(0.99) if latencies else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--proxy")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--cafile", help="CA file to verify an https:// URL's TLS with")
    args = parser.parse_args()
    print("BENCH_RESULT " + json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
