"""The benchmark harness runs and reports what it measured (no timing assertions here: speed
is judged by `make bench`, as ratios within one run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.imports import main as imports_main
from bench.micro.run import main as micro_main
from bench.run import Proxy, Samples, cpu_seconds, peak_rss_mb, process_tree, report
from bench.run import main as bench_main


def test_micro_benchmarks_run_and_print_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    assert micro_main(["--seconds", "0.01"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    names = [row.split("|")[1].strip() for row in rows[1:]]
    assert "dpop proof (ours)" in names
    assert "routing resolve, 50 routes (ours)" in names
    assert all(float(row.split("|")[3]) > 0 for row in rows[2:])


def test_proc_readings_cover_this_process() -> None:
    pids = process_tree(os.getpid())
    assert pids[0] == os.getpid()
    assert cpu_seconds(pids) > 0
    assert peak_rss_mb(pids) > 1


def test_report_states_ratios_and_targets_met_or_missed() -> None:
    def run(rps: float, cpu: float | None, p50: int, p99: int) -> dict[str, object]:
        return {
            "rps": rps, "cpu_us": cpu, "vcpu_per_krps": cpu / 1000 if cpu else None,
            "p50_us": p50, "p90_us": p50 * 2, "p99_us": p99, "rss_mb": 40.0 if cpu else None,
            "token_requests": 0,
        }  # fmt: skip

    proxies = [
        Proxy("direct", "(a) direct", None),
        Proxy("nginx", "(b) nginx", "127.0.0.1:1"),
        Proxy("dpop", "(d) dpop", "127.0.0.1:2", ready_ms=300.0),
        Proxy("dpop2", "(e) dpop x2", "127.0.0.1:3"),
    ]
    samples = {(p.name, shape): Samples() for p in proxies for shape in ("saturation", "paced")}
    for shape in ("saturation", "paced"):
        samples[("direct", shape)].runs = [run(30000, None, 800, 1500)] * 3
        samples[("nginx", shape)].runs = [run(18000, 20.0, 900, 2000)] * 3
        samples[("dpop", shape)].runs = [run(9000, 90.0, 1000, 2400), run(8000, 110.0, 1100, 2600)]
        samples[("dpop2", shape)].runs = [run(16000, 95.0, 900, 2000)]
    meta = {"date": "d", "machine": "m", "origin": "o", "loader": "l", "rounds": 2, "duration": 1}
    text = report(proxies, samples, meta)
    assert "| (d) dpop | 8500 (8000–9000)" in text
    assert "5.0×" in text  # 100 µs median against nginx's 20
    assert "dpop: 100 µs CPU/request, target ≤ 100 µs — met" in text  # no reference: absolute
    assert "`--workers 2` throughput: 1.88× one worker." in text
    assert "+0.25" in text  # added p50 over direct, paced


def test_the_harness_runs_end_to_end_with_its_fallbacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make bench` on a machine without nginx or wrk: aiohttp origin, Python load generator."""
    code = bench_main(
        [
            "--rounds", "1", "--duration", "0.3", "--only", "bearer",
            "--python-load", "--aiohttp-origin", "--no-install", "--results", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    table = (tmp_path / "latest.md").read_text()
    assert "origin: aiohttp" in table
    assert "load: bench.load (Python fallback)" in table
    for label in ("(a) direct to origin", "(r) reference", "(f) floor", "(c) sidecar, Bearer"):
        assert label in table
    assert "errors 0" in capsys.readouterr().out
    (samples,) = tmp_path.glob("*.json")
    assert samples.stat().st_size > 0


def test_report_states_the_floor_and_the_workers_ceiling() -> None:
    def run(rps: float, cpu: float, others: float | None = None) -> dict[str, object]:
        return {
            "rps": rps, "cpu_us": cpu, "vcpu_per_krps": cpu / 1000, "p50_us": 1000,
            "p90_us": 2000, "p99_us": 3000, "rss_mb": 40.0, "token_requests": 0,
            "others_us": others,
        }  # fmt: skip

    proxies = [
        Proxy("floor", "(f) floor", "127.0.0.1:1"),
        Proxy("bearer", "(c) bearer", "127.0.0.1:2"),
        Proxy("dpop", "(d) dpop", "127.0.0.1:3"),
        Proxy("dpop2", "(e) dpop x2", "127.0.0.1:4"),
    ]
    samples = {(p.name, shape): Samples() for p in proxies for shape in ("saturation", "paced")}
    for shape in ("saturation", "paced"):
        samples[("floor", shape)].runs = [run(17000, 60.0)]
        samples[("bearer", shape)].runs = [run(10000, 90.0)]
        samples[("dpop", shape)].runs = [run(6000, 160.0)]
        samples[("dpop2", shape)].runs = [run(9000, 170.0, others=30.0)]
    meta = {"date": "d", "machine": "m", "origin": "o", "loader": "l", "rounds": 1, "duration": 1}
    text = report(proxies, samples, meta)
    assert "bearer: 30 µs per request above the bare forwarder (60 µs): routing," in text
    assert "dpop: 100 µs per request above the bare forwarder (60 µs): the same and a" in text
    # 2 workers at 170 µs + 30 µs for wrk and the origin: at most 1e6 * cores / 200 req/s.
    cores = os.cpu_count() or 1
    ceiling = min(2e6 / 170, cores * 1e6 / 200) / 6000
    assert (
        f"`--workers 2` throughput: 1.50× one worker. The ceiling on this machine is {ceiling:.2f}×"
        in text
    )


def test_the_import_table_has_a_row_per_group_and_a_total(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert imports_main(["--markdown", "--without-aiohttp"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    labels = [row.split("|")[1].strip() for row in rows[1:]]
    assert labels[0].startswith("python")
    assert "grpc (C core)" in labels
    assert "sidecar.* (our modules)" in labels
    assert not [label for label in labels if label.startswith("aiohttp")]
    sizes = [float(row.split("|")[2].strip(" *")) for row in rows[1:]]
    assert sizes[-1] > 20  # the resident total: CPython and asyncio alone are more
    assert abs(sum(sizes[:-1]) - sizes[-1]) < 0.5  # the rows add up to it (rounding)


def test_the_intercepted_https_cell_runs_through_connect_and_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(g): the load generator calls https:// through CONNECT, trusting the exported pod CA."""
    code = bench_main(
        [
            "--rounds", "1", "--duration", "0.3", "--only", "dpoptls",
            "--python-load", "--aiohttp-origin", "--no-install", "--results", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    assert (
        "(g) sidecar, DPoP, app calls https:// (intercepted" in (tmp_path / "latest.md").read_text()
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if " dpoptls " in line]
    assert rows
    assert all(row.endswith("errors 0") for row in rows)
    assert all(float(row.split()[4]) > 0 for row in rows)  # req/s
