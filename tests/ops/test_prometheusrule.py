"""The alert rules we ship (k8s/monitoring/prometheusrule.yaml) are valid Prometheus rules, use
only the metrics docs/operations.md documents, and fire as their unit tests say
(tests/ops/promtool/*.yaml: input series -> expected alerts), checked by promtool itself."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops.test_admin import documented_metrics

ROOT = Path(__file__).resolve().parents[2]
RULE = ROOT / "k8s" / "monitoring" / "prometheusrule.yaml"
UNIT_TESTS = sorted((Path(__file__).parent / "promtool").glob("*.yaml"))
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package `prometheus`; `make test` installs it as root)",
)


def rule_groups() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULE.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    groups: list[dict[str, Any]] = doc["spec"]["groups"]
    return groups


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(  # noqa: S603 - promtool with our own files
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """The groups as a plain rules file, beside copies of the unit tests that load it."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    for test in UNIT_TESTS:
        shutil.copy(test, tmp_path / test.name)
    return tmp_path


def test_the_documented_alerts_are_shipped_on_documented_metrics() -> None:
    documented = documented_metrics()
    used = {name for rule in rules() for name in re.findall(r"\bsidecar_[a-z_]+", rule["expr"])}
    assert used <= set(documented), used - set(documented)
    # docs/operations.md's "Useful alerts": each has its rule.
    for metric in (
        "sidecar_token_requests_total",
        "sidecar_token_expiry_seconds",
        "sidecar_svid_expiry_seconds",
        "sidecar_config_reloads_total",
        "sidecar_route_ready",
        "sidecar_workload_api_events_total",
    ):
        assert metric in used, metric
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for path in UNIT_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == {rule["alert"] for rule in rules()}


@needs_promtool
def test_promtool_checks_the_rules(rules_dir: Path) -> None:
    done = promtool("check", "rules", "rules.yaml", cwd=rules_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


@needs_promtool
def test_promtool_unit_tests_pass(rules_dir: Path) -> None:
    done = promtool("test", "rules", *(t.name for t in UNIT_TESTS), cwd=rules_dir)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_unit_tests_can_fail(rules_dir: Path) -> None:
    """The unit tests are not vacuous: raise a threshold and an expected alert goes missing."""
    text = (rules_dir / "rules.yaml").read_text()
    (rules_dir / "rules.yaml").write_text(text.replace("< 60", "< 20", 1))
    done = promtool("test", "rules", *(t.name for t in UNIT_TESTS), cwd=rules_dir)
    assert done.returncode != 0
