"""The command line: check, explain, and run with a graceful SIGTERM, as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sidecar import cli
from sidecar.cli import main
from sidecar.devstack.stack import SAAS_HOST, DevStack

URL = f"http://{SAAS_HOST}/v1/invoices"


def write_config(stack: DevStack, path: Path, **overrides: Any) -> Path:
    path.write_text(yaml.safe_dump(stack.sidecar_config(**overrides)))
    return path


async def sidecar_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_accepts_a_good_config_and_summarises_routes(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(stack, tmp_path / "good.yaml")
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config OK")
    assert f"route saas: {SAAS_HOST} -> {stack.saas.base_url} via dev" in out
    assert "DELETE,PATCH,POST,PUT /v1/invoices/** -> invoices:write" in out
    assert "default -> invoices:read" in out


async def test_check_reports_every_problem_with_its_yaml_path(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = stack.sidecar_config()
    dest = doc["destinations"][0]
    dest["ca_file"] = str(tmp_path / "missing-ca.pem")
    (tmp_path / "not-a-ca.pem").write_text("hello")
    doc["authorization_servers"]["dev"]["ca_file"] = str(tmp_path / "not-a-ca.pem")
    rule = dest["scopes"]["rules"][0]
    dest["scopes"]["rules"].append(dict(rule, scopes=["shadowed"]))
    doc["authorization_servers"]["spare"] = {"issuer": "https://as.example"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "destinations[0].ca_file:" in err
    assert "does not exist" in err
    assert "authorization_servers.dev.ca_file:" in err
    assert "not a PEM CA bundle" in err
    assert "destinations[0].scopes.rules[1]: never chosen" in err
    assert "authorization_servers.spare: not used" in err


async def test_check_reports_schema_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text("listen: 0.0.0.0:80\ndestinations: {}\n")
    assert main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "listen:" in err
    assert "authorization_servers:" in err


async def test_explain_names_the_rule_and_the_scopes(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(stack, tmp_path / "c.yaml")
    assert main(["explain", "--config", str(path), "-X", "POST", f"{URL}/7"]) == 0
    out = capsys.readouterr().out
    assert "route          saas" in out
    assert "scopes         invoices:write" in out
    assert "rule 0 (DELETE,PATCH,POST,PUT /v1/invoices/** -> invoices:write)" in out
    assert "grant client_credentials, client auth jwt_svid" in out
    assert main(["explain", "--config", str(path), URL]) == 0
    assert "default scopes" in capsys.readouterr().out
    assert main(["explain", "--config", str(path), "http://other.example/"]) == 1
    assert "destination_not_allowed" in capsys.readouterr().out
    assert stack.auth_server.token_requests == []


async def test_explain_fetch_prints_claims_never_the_token(stack: DevStack, tmp_path: Path) -> None:
    path = write_config(stack, tmp_path / "c.yaml")
    code, out, err = await sidecar_cli("explain", "--config", str(path), "--fetch", URL)
    assert code == 0, err
    assert f"sub          {stack.spiffe_id}" in out
    assert "scope        invoices:read" in out
    assert "expires in" in out
    (token,) = stack.auth_server.issued_tokens
    for part in token.split("."):
        assert part not in out
        assert part not in err


@contextlib.asynccontextmanager
async def running_process(
    config_path: Path, *args: str, listening: int = 1, keep_log: bool = False
) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    """`sidecar run` as a process, once ``listening`` processes of it said "listening"."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(config_path),
        "--grace",
        "20",
        *args,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        seen = 0
        proc.log = []  # the lines read so far (keep_log)
        while True:  # bounded by the timeout: each process logs "listening" once it serves
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, "the sidecar exited before listening"
            doc = json.loads(line)
            if keep_log:
                proc.log.append(doc)
            seen += doc["msg"] == "listening"
            if seen == listening:
                yield proc, doc
                break
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigterm_completes_requests_in_flight_and_exits_0(
    stack: DevStack, tmp_path: Path
) -> None:
    path = write_config(stack, tmp_path / "c.yaml")
    async with running_process(path) as (proc, listening), aiohttp.ClientSession() as app:
        proxy = f"http://{listening['proxy']}"
        release = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b'{"part": 1,'
            await release.wait()
            yield b' "part2": 2}'

        request = asyncio.create_task(app.post(URL, data=slow_body(), proxy=proxy))
        await asyncio.wait_for(stack.saas.started.get(), 30)  # in flight, upstream
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        while True:
            doc = json.loads(await asyncio.wait_for(proc.stderr.readline(), 30))
            if doc["msg"] == "shutting down":
                break
        # New connections are refused once draining started...
        with pytest.raises(aiohttp.ClientConnectionError):
            async with app.get(URL, proxy=proxy):
                pass
        # ... and the request in flight completes.
        release.set()
        resp = await asyncio.wait_for(request, 30)
        assert resp.status == 200
        resp.release()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert stack.saas.requests[-1].body_len == len(b'{"part": 1, "part2": 2}')


async def test_workers_share_the_port_and_stop_together(stack: DevStack, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s1, socket.socket() as s2:  # two free ports for fixed addresses
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        proxy_port, admin_port = s1.getsockname()[1], s2.getsockname()[1]
    path = write_config(
        stack,
        tmp_path / "c.yaml",
        listen=f"127.0.0.1:{proxy_port}",
        admin=f"127.0.0.1:{admin_port}",
    )
    async with running_process(path, "--workers", "2", listening=2) as (proc, _):
        async with aiohttp.ClientSession() as app:
            for _ in range(6):
                async with app.get(URL, proxy=f"http://127.0.0.1:{proxy_port}") as resp:
                    assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    # Each worker has its own token cache: at most one token request per worker.
    assert 1 <= len(stack.auth_server.token_requests) <= 2


async def test_demo_runs_end_to_end_and_exits_0() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "demo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    text = out.decode()
    for method in ("GET", "POST"):
        assert f"{method} http://api.saas.example/v1/invoices" in text
    assert text.count("route          saas") == 2
    assert "scopes asked: invoices:read" in text
    assert "scopes asked: invoices:write" in text
    assert text.count("cnf.jkt=") == 2
    assert "sha256 matches" in text
    # Claims are shown, never a token or proof: nothing JWT-shaped (a random jti or thumbprint
    # may hold the three letters "eyJ"; a JWT is eyJ... followed by two dot-separated parts).
    assert re.search(r"eyJ[\w-]*\.[\w-]+\.", text) is None
    # gRPC's own plain-text INFO lines (GOAWAY when the Workload API stops) are silenced.
    assert "chttp2" not in err.decode()


def free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


async def admin_get(port: int, path: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.read()


async def test_workers_answer_on_one_admin_port_for_all(stack: DevStack, tmp_path: Path) -> None:
    """#16 defect 7: /metrics from every worker, /readyz only when every worker is ready."""
    from prometheus_client.parser import text_string_to_metric_families

    proxy_port, admin_port = free_ports(2)
    path = write_config(
        stack,
        tmp_path / "c.yaml",
        listen=f"127.0.0.1:{proxy_port}",
        admin=f"127.0.0.1:{admin_port}",
        tokens={"prefetch": True},  # each worker fetches its token at start: both get ready
    )
    async with running_process(path, "--workers", "2", listening=2) as (proc, _):
        for _ in range(600):  # bounded: until both workers hold their token
            status, body = await admin_get(admin_port, "/readyz")
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200, body
        doc = json.loads(body)
        assert doc["workers"] == {"0": "ready", "1": "ready"}
        assert (await admin_get(admin_port, "/healthz"))[0] == 200
        status, text = await admin_get(admin_port, "/metrics")
        assert status == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples
        }
        ok = (("authorization_server", "dev"), ("outcome", "ok"))
        # Summed over the workers: what the AS saw, not one worker's share.
        assert samples[("sidecar_token_requests_total", ok)] == len(
            stack.auth_server.token_requests
        )
        assert len(stack.auth_server.token_requests) == 2
        workers = {dict(labels).get("worker") for name, labels in samples if "expiry" in name}
        assert workers == {"0", "1"}  # gauges: one series per worker
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_a_worker_killed_by_a_signal_makes_the_group_exit_128_plus_signal(
    stack: DevStack, tmp_path: Path
) -> None:
    proxy_port, admin_port = free_ports(2)
    path = write_config(
        stack,
        tmp_path / "c.yaml",
        listen=f"127.0.0.1:{proxy_port}",
        admin=f"127.0.0.1:{admin_port}",
    )
    async with running_process(path, "--workers", "2", listening=2, keep_log=True) as (
        proc,
        _,
    ):
        started = next(d for d in proc.log if d["msg"] == "workers started")
        os.kill(started["pids"][1], signal.SIGKILL)
        assert proc.stderr is not None
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        assert await asyncio.wait_for(proc.wait(), 30) == 137
    died = [json.loads(line) for line in rest.splitlines() if b"worker died" in line]
    assert len(died) == 1
    assert died[0]["signal"] == "SIGKILL"
    assert died[0]["exit_code"] == 137
    assert died[0]["pid"] == started["pids"][1]


async def test_workers_exit_1_when_the_pod_admin_port_is_taken(
    stack: DevStack, tmp_path: Path
) -> None:
    import socket

    proxy_port, _ = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = write_config(
            stack,
            tmp_path / "c.yaml",
            listen=f"127.0.0.1:{proxy_port}",
            admin=f"127.0.0.1:{taken.getsockname()[1]}",
        )
        code, _, err = await sidecar_cli("run", "--config", str(path), "--workers", "2")
    assert code == 1
    assert "another process using the admin port" in err
    assert "workers started" not in err  # checked before any worker was started


@pytest.mark.parametrize(
    "content",
    [b"a: " + b"[" * 5000 + b"]" * 5000, b"\xff\xfe\x00binary", b"a: 2001-02-30\n"],
)
async def test_unloadable_files_give_one_line_not_a_traceback(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    for args in (
        ("check", "--config", str(path)),
        ("run", "--config", str(path)),
        ("inject", "-f", str(path)),
    ):
        code, _, err = await sidecar_cli(*args)
        assert code != 0, args
        assert "Traceback" not in err, (args, err)
        assert err.strip(), args
        assert len(err.strip().splitlines()) <= 2, (args, err)


async def test_check_warns_when_a_default_scope_covers_writes(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = stack.sidecar_config()
    doc["destinations"][0]["scopes"]["rules"] = [
        {"methods": ["GET"], "paths": ["/v1/**"], "scopes": ["invoices:read"]}
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["check", "--config", str(path)]) == 0  # a warning, not a problem
    out = capsys.readouterr().out
    assert "warning: destinations[0].scopes.default applies to every method" in out
    path = write_config(stack, tmp_path / "good.yaml")
    assert main(["check", "--config", str(path)]) == 0
    assert "warning" not in capsys.readouterr().out  # the dev config has a rule for writes


def test_commands_run_on_uvloop_and_leave_the_event_loop_policy_alone() -> None:
    """`run`, `demo` and `explain --fetch` use uvloop; a global policy would leak into what
    the same process runs next (the suite's in-process harnesses spawn with the stdlib loop's
    vfork: uvloop forks, and runs Python at-fork hooks in the child)."""
    before = asyncio.get_event_loop_policy()

    async def running_loop() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert cli._on_uvloop(running_loop()).startswith("uvloop")
    assert asyncio.get_event_loop_policy() is before
