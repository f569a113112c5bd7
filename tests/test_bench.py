"""The benchmark harness runs and reports what it measured (no timing assertions here: speed
is judged by `make bench`, as ratios within one run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiohttp
import pytest

from bench import run as bench_run
from bench.imports import main as imports_main
from bench.micro.run import main as micro_main
from bench.run import (
    Proxy,
    Samples,
    cpu_seconds,
    otlp_sink,
    peak_rss_mb,
    process_tree,
    report,
    sidecar_env,
)
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
    assert 0 < cpu_seconds(pids, main_thread=True) <= cpu_seconds(pids)
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


async def test_the_traces_sink_answers_otlp_http_and_counts_spans() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    export = ExportTraceServiceRequest()
    scope = export.resource_spans.add().scope_spans.add()
    for name in ("GET api", "GET api", "token request as"):
        scope.spans.add(name=name, trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    async with otlp_sink() as sink, aiohttp.ClientSession() as session:
        headers = {"Content-Type": "application/x-protobuf"}
        async with session.post(
            sink.endpoint, data=export.SerializeToString(), headers=headers
        ) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/x-protobuf"
            ExportTraceServiceResponse.FromString(await resp.read())  # the empty answer
        async with session.get(sink.endpoint) as resp:
            assert resp.status == 404
    assert (sink.spans, sink.exports) == (3, 1)


def test_sidecar_cells_run_without_the_callers_otel_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert not [name for name in sidecar_env(None) if name.startswith("OTEL_")]
    traced = sidecar_env("http://127.0.0.1:1/v1/traces")
    assert {k: v for k, v in traced.items() if k.startswith("OTEL_")} == {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1/v1/traces"
    }


def test_report_states_what_traces_on_cost_over_the_dpop_cell() -> None:
    def run(cpu: float, loop: float, rss: float, spans: int | None) -> dict[str, object]:
        return {
            "rps": 1e6 / cpu, "cpu_us": cpu, "loop_us": loop, "vcpu_per_krps": cpu / 1000,
            "p50_us": 1000, "p90_us": 2000, "p99_us": 3000, "rss_mb": rss, "token_requests": 0,
            "requests": 1000, "spans": spans,
        }  # fmt: skip

    proxies = [
        Proxy("dpop", "(d) dpop", "127.0.0.1:1"),
        Proxy("dpopotel", "(t) dpop, traces on", "127.0.0.1:2"),
    ]
    samples = {(p.name, shape): Samples() for p in proxies for shape in ("saturation", "paced")}
    samples[("dpop", "saturation")].runs = [run(160.0, 150.0, 70.0, None)]
    samples[("dpop", "paced")].runs = [run(250.0, 230.0, 70.0, None)]
    samples[("dpopotel", "saturation")].runs = [run(260.0, 200.0, 82.0, 512)]
    samples[("dpopotel", "paced")].runs = [run(380.0, 300.0, 82.0, 1024)]
    meta = {"date": "d", "machine": "m", "origin": "o", "loader": "l", "rounds": 1, "duration": 1}
    text = report(proxies, samples, meta)
    assert (
        "traces on (t): +100 µs per request over (d) (1.62×) saturated (+50 µs on the event "
        "loop's thread, +50 µs in the others: the exporter's), +130 µs paced; peak RSS 82 MB "
        "against 70 MB; the sink received 1536 spans during 2000 requests." in text
    )


def test_the_traced_cell_exports_a_span_per_request_to_the_sink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(t): the sidecar with OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set exports to the bench's sink."""
    code = bench_main(
        [
            "--rounds", "1", "--duration", "0.5", "--only", "dpopotel",
            "--python-load", "--aiohttp-origin", "--no-install", "--results", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    assert "(t) sidecar, DPoP, traces on" in (tmp_path / "latest.md").read_text()
    rows = [line for line in capsys.readouterr().out.splitlines() if " dpopotel " in line]
    assert rows
    assert all(row.endswith("errors 0") for row in rows)
    (results,) = tmp_path.glob("*.json")
    runs = json.loads(results.read_text())["samples"]
    traced = runs["dpopotel/saturation"] + runs["dpopotel/paced"]
    # The batch thread sends 512 at a time or every 5 s: some spans arrive after the cell.
    assert sum(r["spans"] for r in traced) > 0
    assert sum(r["spans"] for r in traced) <= sum(r["requests"] for r in traced) + 25
    assert all(r["spans"] is None for r in runs["aiohttp/saturation"])


def test_without_opentelemetry_the_traced_cell_is_skipped_saying_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_run, "tracing_missing", lambda: "opentelemetry.sdk is not here")
    code = bench_main(
        [
            "--rounds", "1", "--duration", "0.1", "--only", "dpopotel",
            "--python-load", "--aiohttp-origin", "--no-install", "--results", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    assert "dpopotel skipped: opentelemetry.sdk is not here" in capsys.readouterr().out
    assert "(t)" not in (tmp_path / "latest.md").read_text()
