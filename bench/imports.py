"""Where a worker's memory goes at start: the resident set each import adds, in MB.

    .venv/bin/python -m bench.imports            # the table docs/benchmarks.md shows
    .venv/bin/python -m bench.imports --markdown

One fresh interpreter (``python -S``-like: only what ``sidecar run`` loads) imports the groups
below in the order a worker does, and reads ``VmRSS`` from /proc after each; the row is the
difference. Each group is imported once, in one child process, with a time limit: bounded and
deterministic (the figures vary by a few hundred kB between runs with the allocator's luck).
A module already pulled in by an earlier group costs nothing in a later one: the order is
the one ``sidecar.runtime`` imports them in, so each row is what that step really adds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# (label, the statements that import the group), in a worker's import order.
GROUPS: tuple[tuple[str, str], ...] = (
    ("python (interpreter, site)", "pass"),
    ("asyncio + ssl (OpenSSL)", "import asyncio, ssl"),
    ("uvloop (libuv)", "import uvloop"),
    ("httptools (llhttp)", "import httptools"),
    ("yaml (libyaml)", "import yaml"),
    (
        "cryptography (EC, X.509; its Rust core)",
        "from cryptography import x509\nfrom cryptography.hazmat.primitives.asymmetric import ec",
    ),
    ("pyjwt (+ urllib.request, email, http.client)", "import jwt"),
    ("cachetools", "import cachetools"),
    ("prometheus_client (+ http.server, wsgiref)", "import prometheus_client"),
    ("grpc (C core)", "import grpc, grpc.aio"),
    ("protobuf (upb)", "import google.protobuf.message, google.protobuf.descriptor_pool"),
    ("pyasn1 + pyasn1_modules (spiffe's X.509 parsing)", "import pyasn1_modules.rfc5280"),
    ("spiffe (its own modules, stubs)", "import spiffe"),
    ("aiohttp (no longer in `sidecar run`)", "import aiohttp"),
    ("sidecar.* (our modules)", "import sidecar.runtime, sidecar.cli"),
)

_CHILD = r"""
import json, sys
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
rows, before = [], 0  # the first row is the bare interpreter's own resident set
for label, code in json.loads(sys.argv[1]):
    exec(code, {})
    now = rss()
    rows.append((label, now - before))
    before = now
print(json.dumps({"rows": rows, "total": rss(), "modules": sorted(sys.modules)}))
"""


def measure(groups: tuple[tuple[str, str], ...] = GROUPS, *, skip: str = "") -> dict[str, object]:
    """Import the groups in a fresh interpreter; kB added by each, the final RSS, modules."""
    chosen = [g for g in groups if not skip or g[1] != skip]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(chosen)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def table(result: dict[str, object], *, markdown: bool) -> str:
    rows = result["rows"]
    assert isinstance(rows, list)
    total = result["total"]
    assert isinstance(total, int)
    lines = []
    if markdown:
        lines += ["| import | adds (MB) |", "|---|---:|"]
        lines += [f"| {label} | {kb / 1024:.1f} |" for label, kb in rows]
        lines.append(f"| **resident after all of them** | **{total / 1024:.1f}** |")
    else:
        width = max(len(label) for label, _ in rows)
        lines += [f"{label:<{width}}  {kb / 1024:6.1f} MB" for label, kb in rows]
        lines.append(f"{'resident after all of them':<{width}}  {total / 1024:6.1f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="a table for docs/benchmarks.md")
    parser.add_argument(
        "--without-aiohttp",
        action="store_true",
        help="leave aiohttp out (what `sidecar run` loads)",
    )
    args = parser.parse_args(argv)
    result = measure(skip="import aiohttp" if args.without_aiohttp else "")
    print(table(result, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
