"""The container image, by inspection: no engine runs here, so the Dockerfile is linted with
hadolint and the properties the Kubernetes manifests rely on are checked one by one."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar import __version__

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (make test installs it)")
    result = subprocess.run(  # noqa: S603 - our own file, a pinned tool
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_with_version_pinned_slim_bases() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    for stage in all_stages:
        image = stage[0][1].split()[0]
        name, _, tag = image.partition(":")
        assert name == "python", image
        assert re.fullmatch(r"\d+\.\d+\.\d+-slim-\w+", tag), f"{image}: pin an exact version"
    final = all_stages[-1]
    assert any(i == "COPY" and a.startswith("--from=") for i, a in final)


def test_runtime_stage_is_non_root_exec_form_and_needs_no_shell() -> None:
    final = dict(reversed(stages()[-1]))  # the first occurrence of each instruction wins
    user = final["USER"].split(":")
    assert all(part.isdigit() and int(part) != 0 for part in user), "numeric non-root user"
    assert json.loads(final["ENTRYPOINT"]) == ["sidecar"]
    assert json.loads(final["CMD"]) == ["run"]
    assert "RUN" not in final, "the runtime stage runs nothing: no shell is needed"
    env = " ".join(a for i, a in stages()[-1] if i == "ENV")
    assert "SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root filesystem


def test_everything_copied_exists_and_passes_the_dockerignore() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        for pattern in ignore:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                keep = negate
        return keep

    for instruction, args in instructions():
        if instruction != "COPY" or args.startswith("--from="):
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert included(source.rstrip("/")), f"{source} is excluded by .dockerignore"


def test_every_manifest_uses_the_image_of_this_release() -> None:
    expected = f"ghcr.io/spiffe-oauth-sidecar/sidecar:{__version__}"
    text = "\n".join(p.read_text() for p in (ROOT / "k8s").rglob("*.yaml"))
    images = set(re.findall(r"ghcr\.io/spiffe-oauth-sidecar/sidecar:[\w.-]+", text))
    assert images == {expected}


def test_the_image_default_config_is_valid() -> None:
    from sidecar import config

    doc = yaml.safe_load((ROOT / "config" / "sidecar.yaml").read_text())
    config.parse(doc, env={"SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock"})
