"""The package's shape (docs/architecture.md): what the product imports, and who may import whom.

- ``sidecar run`` carries one HTTP stack: neither the runtime nor a running ``sidecar run``
  has aiohttp (or anything of the dev stack) in ``sys.modules``, nor OpenTelemetry when it is
  not told to trace;
- import rules, read from the source with ``ast``: nothing imports ``sidecar.cli``; only the
  CLI and the dev stack itself import ``sidecar.devstack``; ``sidecar.credentials`` does not
  import the rooms above it (proxy, ops' admin port, runtime); only commands import
  ``runtime``; and there is no import cycle between modules.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from sidecar.devstack.stack import DevStack

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sidecar"
# aiohttp and the packages only it brings; the development-only peers; OpenTelemetry, which
# only a sidecar told to trace loads (OTEL_EXPORTER_OTLP_*, sidecar/ops/tracing.py).
FOREIGN_PACKAGES = frozenset(
    {"aiohttp", "yarl", "multidict", "aiohappyeyeballs", "frozenlist", "opentelemetry"}
)


def foreign(modules: list[str]) -> list[str]:
    return [
        m
        for m in modules
        if m.split(".")[0] in FOREIGN_PACKAGES or m.startswith("sidecar.devstack")
    ]


def test_importing_the_runtime_loads_neither_aiohttp_nor_the_dev_stack() -> None:
    code = "import json, sys, sidecar.runtime; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(  # noqa: S603 - our own interpreter, a fixed command
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    modules = json.loads(out.stdout)
    assert "sidecar.runtime" in modules
    assert foreign(modules) == []


def test_sidecar_run_loads_neither_aiohttp_nor_the_dev_stack(
    stack: DevStack, tmp_path: Path
) -> None:
    """A real ``sidecar run`` against the dev Workload API: once it listens, SIGTERM; on its
    way out it writes what it had imported."""
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump(stack.sidecar_config()))
    seen = tmp_path / "modules.json"
    code = (
        "import atexit, json, runpy, sys\n"
        f"out = {str(seen)!r}\n"
        "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted(sys.modules))))\n"
        f"sys.argv = ['sidecar', 'run', '--config', {str(cfg)!r}]\n"
        "runpy.run_module('sidecar', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter, a fixed command
        [sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert proc.stderr is not None
        for _ in range(200):  # bounded: a handful of start-up log lines
            line = proc.stderr.readline()
            if not line or "listening" in line:
                break
        assert line, "sidecar run exited before listening"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
    modules = json.loads(seen.read_text())
    assert "sidecar.runtime" in modules
    assert "sidecar.proxy.listener" in modules
    assert foreign(modules) == []


# -- import rules --------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every sidecar module ``path`` imports, at any depth, except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name.split(".")[0] == "sidecar"}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imports_of(path) if m in modules and m != name}
        for name, path in modules.items()
    }


# The commands that start a whole sidecar. ops.checks does for `explain --fetch` (lazily, in
# the command's function): a command living in the ops room, the one exception to "never above".
RUNTIME_USERS = frozenset({"sidecar.cli", "sidecar.ops.checks", "sidecar.devstack.demo"})


def test_nothing_imports_the_cli_and_only_commands_import_the_runtime() -> None:
    for name, deps in graph().items():
        if name != "sidecar.__main__":
            assert "sidecar.cli" not in deps, name
        if name not in RUNTIME_USERS:
            assert "sidecar.runtime" not in deps, name


def test_only_the_cli_and_the_dev_stack_import_the_dev_stack() -> None:
    for name, deps in graph().items():
        if name == "sidecar.cli" or name.startswith("sidecar.devstack"):
            continue
        assert not [d for d in deps if d.startswith("sidecar.devstack")], name


def test_credentials_do_not_import_the_rooms_above_them() -> None:
    above = ("sidecar.proxy", "sidecar.runtime", "sidecar.cli", "sidecar.ops.admin")
    for name, deps in graph().items():
        if name.startswith("sidecar.credentials"):
            assert not [d for d in deps if d.startswith(above)], name


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(edges[name]):
            if dep == "sidecar" or name == "sidecar":
                continue  # the package's __init__ holds only the version
            if state.get(dep) == 1:
                raise AssertionError(" -> ".join([*path, name, dep]))
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])
