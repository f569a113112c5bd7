"""The reliability harness (`make chaos`): its fault proxy does each fault on real loopback
sockets, its arithmetic (recovery, token requests per key per window) is right, and one tiny
scenario runs end to end against the real sidecar and writes its report."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chaos.faults import Fault, FaultProxy
from chaos.harness import connections_to, metric_value
from chaos.load import CLOSED, TIMEOUT, Answer, recovery
from chaos.measure import Result, token_window_max
from chaos.report import render
from chaos.run import main as chaos_main
from chaos.scenarios import EXPECTED_FAILURES, SCENARIOS
from sidecar.devstack.auth_server import TokenRequestRecord


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def echo_behind_proxy(tmp_path: Path, *, unix: bool) -> AsyncIterator[FaultProxy]:
    if unix:
        server = await asyncio.start_unix_server(_echo, path=tmp_path / "echo.sock")
        proxy = FaultProxy(tmp_path / "echo.sock", listen_path=tmp_path / "proxy.sock")
    else:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        proxy = FaultProxy(("127.0.0.1", server.sockets[0].getsockname()[1]))
    async with server, proxy:
        yield proxy


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if proxy.listen_path is not None:
        return await asyncio.open_unix_connection(proxy.listen_path)
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def roundtrip(proxy: FaultProxy, data: bytes) -> bytes:
    reader, writer = await connect(proxy)
    try:
        writer.write(data)
        await writer.drain()
        return await reader.readexactly(len(data))
    finally:
        writer.close()


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
async def test_pass_and_refuse_then_recover(tmp_path: Path, unix: bool) -> None:
    async with echo_behind_proxy(tmp_path, unix=unix) as proxy:
        assert await roundtrip(proxy, b"hello") == b"hello"
        reader, writer = await connect(proxy)  # open when the peer goes away
        await proxy.set(Fault.REFUSE)
        assert await reader.read() == b""  # dropped
        writer.close()
        with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
            await connect(proxy)
        if unix:
            assert proxy.listen_path is not None
            assert not proxy.listen_path.exists()
        await proxy.set(Fault.PASS)
        assert await roundtrip(proxy, b"again") == b"again"


async def test_reset_sends_rst_to_open_and_new_connections(tmp_path: Path) -> None:
    async with echo_behind_proxy(tmp_path, unix=False) as proxy:
        reader, writer = await connect(proxy)
        await proxy.set(Fault.RESET)
        with pytest.raises(ConnectionResetError):
            await reader.read(1)
        writer.close()
        reader, writer = await connect(proxy)
        writer.write(b"x")
        with pytest.raises(ConnectionResetError):
            await reader.read(1)
        writer.close()
        assert proxy.stats.reset >= 2


async def test_stall_holds_the_answer_until_the_peer_recovers(tmp_path: Path) -> None:
    async with echo_behind_proxy(tmp_path, unix=False) as proxy:
        await proxy.set(Fault.STALL)
        reader, writer = await connect(proxy)
        writer.write(b"ping")
        await writer.drain()
        read = asyncio.ensure_future(reader.readexactly(4))
        await proxy.holding.wait()  # the echo answered; the proxy holds it back
        assert not read.done()
        await proxy.set(Fault.PASS)
        assert await read == b"ping"
        writer.close()


async def test_trickle_answers_byte_by_byte_and_garbage_replaces_the_answer(
    tmp_path: Path,
) -> None:
    async with echo_behind_proxy(tmp_path, unix=False) as proxy:
        await proxy.set(Fault.TRICKLE, interval=0.0)
        assert await roundtrip(proxy, b"slowly") == b"slowly"
        assert proxy.stats.trickled == len(b"slowly")
        await proxy.set(Fault.GARBAGE)
        answer = await roundtrip(proxy, b"\x00" * 64)
        assert len(answer) == 64
        assert answer != b"\x00" * 64
        assert proxy.stats.garbled == 1
        await proxy.set(Fault.DELAY, delay=0.0)
        assert await roundtrip(proxy, b"late") == b"late"
        assert proxy.stats.delayed == 1


def _answer(sent: float, status: int, kind: str | None = None) -> Answer:
    return Answer(sent, sent + 0.1, status, kind or str(status))


def test_connections_to_counts_this_process_sockets_to_one_port() -> None:
    """What reload churn bounds the upstream pool by: real loopback sockets, told by port."""
    with contextlib.ExitStack() as stack:
        listeners = [stack.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in "ab"]
        ports = [s.getsockname()[1] for s in listeners]
        for port, n in zip(ports, (3, 1), strict=True):
            for _ in range(n):
                stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        assert connections_to(os.getpid(), ports[0]) == 3
        assert connections_to(os.getpid(), ports[1]) == 1
    assert connections_to(os.getpid(), ports[0]) == 0  # closed


def test_recovery_is_the_last_failure_not_the_first_success() -> None:
    answers = [
        _answer(0.0, 200), _answer(1.0, 503), _answer(2.0, 503),  # fault 1.0 .. 2.5
        _answer(3.0, 200), _answer(4.0, 0, TIMEOUT), _answer(5.0, 200), _answer(6.0, 200),
    ]  # fmt: skip
    found = recovery(answers, fault_end=2.5)
    assert found.first_ok == pytest.approx(0.6)  # answered at 3.1
    assert found.all_ok == pytest.approx(2.5)  # everything from 5.0 on succeeded
    assert recovery([*answers, _answer(7.0, 0, CLOSED)], 2.5).all_ok is None  # never


def test_token_requests_are_counted_per_key_in_a_sliding_window() -> None:
    def record(at: float, scope: tuple[str, ...]) -> TokenRequestRecord:
        return TokenRequestRecord("client_credentials", "c", "", scope, (), (), "jkt", at=at)

    records = [record(t, ("a",)) for t in (0.0, 0.5, 0.9, 1.6, 5.0)] + [record(0.1, ("b",))]
    assert token_window_max(records, 1.0) == (2, 3)  # 0.0, 0.5, 0.9 within one second
    assert token_window_max(records, 0.2) == (2, 1)


def test_metric_values_sum_the_matching_series() -> None:
    text = (
        "# HELP sidecar_config_reloads_total reloads\n"
        'sidecar_config_reloads_total{outcome="success"} 3.0\n'
        'sidecar_config_reloads_total{outcome="failure"} 1.0\n'
        'sidecar_config_reloads_created{outcome="success"} 1.7e9\n'
    )
    assert metric_value(text, "sidecar_config_reloads_total", {"outcome": "success"}) == 3.0
    assert metric_value(text, "sidecar_config_reloads_total", {}) == 4.0


def test_report_marks_known_failures_and_failing_bounds() -> None:
    failing = Result("as_refused", "AS refused", "refuse 8 s")
    failing.check("recovered within 3 x the AS timeout (6 s)", False, "26.70 s")
    passing = Result("steady", "Steady", "none", sent=10)
    passing.check("no request lost", True, 0)
    meta = {"date": "d", "machine": "m", "command": "c", "scale": "1", "elapsed": "1 s"}
    text = render([failing, passing], meta)
    assert "| recovered within 3 x the AS timeout (6 s) | **no** | 26.70 s |" in text
    assert "| `steady` | passed | 10 | 0 | - |" in text
    assert "FAILED" in text  # not listed as known: it fails the run
    assert failing.fails_run
    failing.known = "16.5"
    assert "known failing (#16.5)" in render([failing], meta)
    assert not failing.fails_run


def test_every_expected_failure_names_a_scenario_and_a_defect() -> None:
    names = {s.name for s in SCENARIOS}
    for name, defect in EXPECTED_FAILURES.items():
        assert name in names
        assert defect.startswith("16.")


def test_a_tiny_scenario_runs_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "reliability.md"
    code = chaos_main(["--only", "steady", "--scale", "0.3", "--report", str(report)])
    assert code == 0, capsys.readouterr().out
    text = report.read_text()
    assert "### `steady`" in text
    assert "| no request lost (every request got an HTTP answer) | yes | 0 |" in text
    assert "| every 200 was a request the API verified | yes |" in text
