"""``make chaos`` (``python -m chaos``): every scenario, one after another, then the report.

    python -m chaos [--only NAME ...] [--scale 1.0] [--report docs/reliability.md]

Exits 1 when a scenario not listed in ``EXPECTED_FAILURES`` fails one of its bounds (after the
report is written), 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

from chaos.measure import Result
from chaos.report import render
from chaos.scenarios import SCENARIOS, run_scenario

ROOT = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    names = [s.name for s in SCENARIOS]
    parser.add_argument("--only", action="append", choices=names, help="run just these")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="fault and load durations x this (smoke: 0.3)"
    )
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--work", type=Path, help="keep configs and sidecar logs here")
    return parser


def _raise_nofile() -> None:
    """The load generator holds up to a thousand connections: lift our own soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


async def run_all(names: Sequence[str] | None, scale: float, work: Path) -> list[Result]:
    results = []
    for scenario in SCENARIOS:
        if names and scenario.name not in names:
            continue
        started = time.monotonic()
        print(f"chaos: {scenario.name} ...", flush=True)
        result = await run_scenario(scenario, work, scale=scale)
        elapsed = time.monotonic() - started
        failed = [c.what for c in result.checks if not c.passed]
        detail = result.error or "; ".join(failed) or "all bounds kept"
        print(f"chaos: {scenario.name}: {result.status} ({elapsed:.0f} s) {detail}", flush=True)
        results.append(result)
    return results


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    python = sys.version.split()[0]
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {python}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _raise_nofile()
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    started = time.monotonic()
    results: list[Result] = []
    try:
        results = uvloop.run(run_all(args.only, args.scale, work))
    finally:
        if args.work is None and not any(not r.passed for r in results):
            shutil.rmtree(work, ignore_errors=True)
        elif results:
            print(f"chaos: configs and sidecar logs kept in {work}")
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "make chaos" if not argv else "python -m chaos " + " ".join(argv),
        "scale": f"{args.scale:g}",
        "elapsed": f"{time.monotonic() - started:.0f} s",
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(render(results, meta))
    print(f"chaos: report written to {args.report}")
    failing = [r.name for r in results if r.fails_run]
    if failing:
        print(f"chaos: FAILED: {', '.join(failing)}", file=sys.stderr)
        return 1
    return 0
