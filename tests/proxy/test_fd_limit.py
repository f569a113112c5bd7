"""#16 defect 8: running out of file descriptors is logged (once a minute, with the limit),
counted, and the admin port keeps answering. A real `sidecar run` in a subprocess whose
RLIMIT_NOFILE the test lowers, flooded with connections until the limit is reached."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.devstack.stack import DevStack

LIMIT = 128
WRAPPER = (
    "import resource, sys\n"
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, {LIMIT}))\n"
    "from sidecar.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


async def test_fd_exhaustion_is_logged_counted_and_admin_still_answers(
    stack: DevStack, tmp_path: Path
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(stack.sidecar_config()))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRAPPER,
        "run",
        "--config",
        str(path),
        "--grace",
        "1",
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    held: list[asyncio.StreamWriter] = []
    try:
        while True:  # bounded by the timeout
            doc = json.loads(await asyncio.wait_for(proc.stderr.readline(), 30))
            if doc["msg"] == "listening":
                break
        proxy_host, proxy_port = doc["proxy"].rsplit(":", 1)
        admin = f"http://{doc['admin']}"
        for _ in range(LIMIT + 40):  # more connections than the sidecar has descriptors
            reader, writer = await asyncio.open_connection(proxy_host, int(proxy_port))
            held.append(writer)
        # The last one is past the limit: closed at once, unanswered (accepts are in order,
        # so every connection before it has been dealt with too).
        assert await asyncio.wait_for(reader.read(), 30) == b""
        async with aiohttp.ClientSession() as session:
            for _ in range(3):  # the admin port answers while the proxy is at its limit
                async with session.get(f"{admin}/healthz") as resp:
                    assert resp.status == 200
            async with session.get(f"{admin}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        refused = samples[("sidecar_app_connections_refused_total", (("reason", "fd_limit"),))]
        served = samples[("sidecar_app_connections", ())]
        assert refused >= 1
        assert served + refused == LIMIT + 40  # every connection: served or refused, counted
        assert served < LIMIT
        assert samples[("sidecar_fd_exhausted_total", (("where", "accept"),))] == refused
    finally:
        for writer in held:
            writer.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        await asyncio.wait_for(proc.wait(), 30)
    lines = [json.loads(line) for line in rest.splitlines() if b"descriptor limit" in line]
    assert len(lines) == 1  # once a minute, however many connections were refused
    assert lines[0]["fd_limit"] == LIMIT
    assert lines[0]["level"] == "error"
