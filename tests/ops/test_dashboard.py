"""The Grafana dashboard (k8s/monitoring/grafana-dashboard.json) and its provisioning ConfigMap.

Grafana's own schema checks its structure: tests/ops/dashboard_schema decodes it strictly with
the Grafana Foundation SDK (every field known and well-typed, per panel type and for each
Prometheus query) and runs the schema's validation (`make dashboard-schema` builds it from the
Go module proxy). Grafana's dashboard linter has no usable version here, so its rules that
matter to us are checked here, with the fallback the issue names: every query names metrics
(and labels) the sidecar exports, as docs/operations.md lists them and a running sidecar
exposes them; every query goes through the datasource variable, filters by job, namespace and
pod, and rates over ``$__rate_interval``; every panel has a title, a description and a unit;
promtool parses every query (when installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.devstack.stack import SAAS_HOST
from sidecar.runtime import Sidecar
from tests.conftest import AppClient
from tests.interop.cache import cache_dir, missing
from tests.ops.test_admin import admin_get, documented_metrics

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
CONFIGMAP = MONITORING / "grafana-dashboard.yaml"
SCHEMA_TOOL = ROOT / "tests" / "ops" / "dashboard_schema"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Labels Prometheus adds to every scraped series (the PodMonitor's job, the pod's namespace/pod).
TARGET_LABELS = {"job", "namespace", "pod"}
FILTERS = {name: f"${name}" for name in TARGET_LABELS}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*,?')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[([^\]]*)\]")
_NAME = re.compile(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(?!\s*\()")
_CALL = re.compile(r"\b(rate|irate|increase|delta|changes)\s*\(")


class Query:
    """One PromQL expression taken apart: metric names, matchers, grouping labels, ranges."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        # String literals first (a matcher's value may hold "}" or ","), put back by number.
        strings: list[str] = []

        def hide(found: re.Match[str]) -> str:
            strings.append(json.loads(found.group(0)))
            return f'"{len(strings) - 1}"'

        masked = _STRING.sub(hide, expr)
        self.selectors: list[dict[str, tuple[str, str]]] = []
        for body in _SELECTOR.findall(masked):
            matchers = {
                name: (op, strings[int(json.loads(value))])
                for name, op, value in _MATCHER.findall(body)
            }
            assert _MATCHER.sub("", body).strip() == "", f"unparsed matcher in {{{body}}}"
            self.selectors.append(matchers)
        rest = _SELECTOR.sub(" ", masked)
        self.grouping = {
            label.strip() for _, labels in _GROUPING.findall(rest) for label in labels.split(",")
        } - {""}
        self.ranges = _RANGE.findall(rest)
        rest = _RANGE.sub(" ", _GROUPING.sub(" ", rest))
        self.names = [n for n in _NAME.findall(rest) if n.lower() not in KEYWORDS]
        self.rated = len(_CALL.findall(expr))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def queries() -> Iterator[tuple[str, Query]]:
    for panel in panels():
        for target in panel["targets"]:
            yield f"{panel['title']} {target['refId']}", Query(target["expr"])
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["definition"])
            assert found, variable["name"]
            assert variable["query"]["query"] == variable["definition"]
            yield f"variable {variable['name']}", Query(found.group(1))


def base_name(name: str, documented: dict[str, tuple[str, set[str]]]) -> str:
    """The documented metric a series name belongs to (a histogram's _bucket/_sum/_count)."""
    if name in documented:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        stem = name.removesuffix(suffix)
        if stem != name and documented.get(stem, ("", set()))[0] == "histogram":
            return stem
    raise AssertionError(f"{name} is not a metric docs/operations.md lists")


# -- the query parser itself -----------------------------------------------------------------------


def test_the_query_parser_finds_names_labels_and_ranges() -> None:
    q = Query(
        'histogram_quantile(0.99, sum by (route, le) (rate(a_bucket{job=~"$job", x="a,}b"}'
        "[$__rate_interval]))) / on (route) group_left b_total or vector(0)"
    )
    assert q.names == ["a_bucket", "b_total"]
    assert q.selectors == [{"job": ("=~", "$job"), "x": ("=", "a,}b")}]
    assert q.grouping == {"route", "le"}
    assert q.ranges == ["$__rate_interval"]
    assert q.rated == 1
    with pytest.raises(AssertionError):
        Query('a{job=~"$job", ???}')
    with pytest.raises(AssertionError, match="not a metric"):
        base_name("sidecar_requests_bucket", documented_metrics())


# -- what the queries name -------------------------------------------------------------------------


def test_every_query_names_documented_metrics_and_their_labels() -> None:
    documented = documented_metrics()
    used: set[str] = set()
    for where, query in queries():
        assert query.names, f"{where}: no metric in {query.expr}"
        metrics = {base_name(name, documented) for name in query.names}
        used |= metrics
        labels = set().union(*(documented[m][1] for m in metrics)) | TARGET_LABELS
        if any(documented[m][0] == "histogram" for m in metrics):
            labels.add("le")
        for matchers in query.selectors:
            assert set(matchers) <= labels, (where, set(matchers) - labels)
        assert query.grouping <= labels, (where, query.grouping - labels)
    # The panels the issue asks for have their metrics.
    assert {
        "sidecar_requests_total",
        "sidecar_upstream_latency_seconds",
        "sidecar_token_requests_total",
        "sidecar_token_expiry_seconds",
        "sidecar_svid_expiry_seconds",
        "sidecar_route_ready",
        "sidecar_config_reloads_total",
        "sidecar_intercept_handshakes_total",
        "sidecar_request_errors_total",
        "sidecar_added_latency_seconds",
        "sidecar_route_info",
    } <= used


async def test_every_queried_metric_is_exposed_by_a_running_sidecar(
    sidecar: Sidecar, app: AppClient
) -> None:
    assert (await app.request("GET", f"http://{SAAS_HOST}/v1/invoices"))[0] == 200
    status, text = await admin_get(sidecar, "/metrics")
    assert status == 200
    # A family is announced even before its first sample (the request above gave the rest one).
    exposed = dict(re.findall(r"^# TYPE (sidecar_\w+) (\w+)$", text, re.M))
    documented = documented_metrics()
    for where, query in queries():
        for name in query.names:
            metric = base_name(name, documented)
            assert metric in exposed, f"{where}: {metric} is not on /metrics"
            assert exposed[metric] == documented[metric][0], metric


# -- Grafana's schema ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dashboard_schema() -> Path:
    found = re.search(
        r"^require github\.com/grafana/grafana-foundation-sdk/go (v[0-9.]+)$",
        (SCHEMA_TOOL / "go.mod").read_text(),
        re.M,
    )
    assert found, "tests/ops/dashboard_schema/go.mod pins no SDK version"
    binary = cache_dir() / f"dashboard-schema-{found.group(1)}" / "dashboard-schema"
    if not binary.is_file():
        missing(f"the dashboard schema check is not built at {binary}: run `make dashboard-schema`")
    return binary


def schema_check(tool: Path, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own checker, our files
        [str(tool), *map(str, paths)], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_dashboard_matches_grafanas_schema(dashboard_schema: Path, tmp_path: Path) -> None:
    done = schema_check(dashboard_schema, DASHBOARD)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{DASHBOARD}: ok"
    # The checker fails what Grafana's schema does not know: a misspelt panel field, a query
    # without its expression, a wrongly typed grid position.
    mutations = {
        "field": lambda d: d["panels"][1].update(titel="x"),
        "query": lambda d: d["panels"][1]["targets"][0].pop("expr"),
        "type": lambda d: d["panels"][1]["gridPos"].update(h="8"),
        "legend": lambda d: d["panels"][1]["options"]["legend"].pop("calcs"),
    }
    paths = []
    for name, mutate in mutations.items():
        mutated = dashboard()
        mutate(mutated)
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(mutated))
    done = schema_check(dashboard_schema, *paths)
    assert done.returncode == 1
    assert [line.split(":")[0] for line in done.stdout.splitlines() if ".json:" in line] == [
        str(p) for p in paths
    ]
    assert "unexpected field 'titel'" in done.stdout
    assert "expr: required field is missing" in done.stdout
    assert "gridPos.h" in done.stdout


# -- the linter's rules ----------------------------------------------------------------------------


def test_queries_use_the_datasource_variable_and_filter_by_target() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in TARGET_LABELS:
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"
    for panel in panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
    for where, query in queries():
        if where.startswith("variable"):
            continue
        assert query.selectors, where
        for matchers in query.selectors:
            for label, value in FILTERS.items():
                assert matchers.get(label) == ("=~", value), f"{where}: {label}=~{value!r}"


def test_rates_span_the_rate_interval() -> None:
    for where, query in queries():
        assert query.ranges == ["$__rate_interval"] * query.rated, (where, query.ranges)


def test_panels_have_a_title_a_description_a_unit_and_a_place() -> None:
    seen_ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        assert panel["id"] not in seen_ids
        seen_ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
    for panel in panels():
        assert panel["title"], panel
        assert panel["description"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs, panel["title"]
        assert len(refs) == len(set(refs)), panel["title"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_parses_every_query(tmp_path: Path) -> None:
    # Grafana fills $__rate_interval with a duration before the query reaches Prometheus.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": q.expr.replace("$__rate_interval", "5m")}
        for i, (_, q) in enumerate(queries())
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(  # noqa: S603 - promtool from PATH, our file
        ["promtool", "check", "rules", str(path)],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


# -- provisioning ----------------------------------------------------------------------------------


def configmap_text() -> str:
    """The provisioning ConfigMap, generated from the JSON (`make k8s-examples` writes it)."""
    body = "\n".join(
        f"    {line}" if line else "" for line in DASHBOARD.read_text().rstrip("\n").split("\n")
    )
    return (
        "# Generated from grafana-dashboard.json by `make k8s-examples`: edit the JSON.\n"
        "# Grafana's dashboard sidecar (kube-prometheus-stack: grafana.sidecar.dashboards) loads\n"
        "# ConfigMaps labelled grafana_dashboard=1; apply this in the namespace it watches.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: spiffe-oauth-sidecar-dashboard\n"
        "  labels:\n"
        '    grafana_dashboard: "1"\n'
        "    app.kubernetes.io/name: spiffe-oauth-sidecar\n"
        "    app.kubernetes.io/component: dashboard\n"
        "data:\n"
        "  spiffe-oauth-sidecar.json: |\n"
        f"{body}\n"
    )


def write_configmap() -> None:
    CONFIGMAP.write_text(configmap_text())


def test_the_provisioning_configmap_holds_the_dashboard_as_generated() -> None:
    assert CONFIGMAP.read_text() == configmap_text(), "run `make k8s-examples`"
    (doc,) = [d for d in yaml.safe_load_all(CONFIGMAP.read_text()) if d]
    assert json.loads(doc["data"]["spiffe-oauth-sidecar.json"]) == dashboard()
    assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
