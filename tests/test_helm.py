"""The Helm chart (charts/spiffe-oauth-sidecar): `helm lint`, `helm template` with the default and
a full values file, every rendered manifest validated like k8s/ is, the default rendering equal in
substance to k8s/webhook, and the values it refuses.

helm is built from the Go module proxy at the version tests/helm/tool/go.mod pins (`make helm`,
which `make test` runs) into the shared cache; without it these tests skip and say so."""

from __future__ import annotations

import base64
import copy
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import config
from sidecar.cli import build_parser
from sidecar.devstack.pki import DevCA
from tests.interop.cache import cache_dir, missing
from tests.test_kubernetes import K8S, ROOT, load_docs, validate

CHART = ROOT / "charts" / "spiffe-oauth-sidecar"
TOOL = ROOT / "tests" / "helm" / "tool"
VALUES_FULL = ROOT / "tests" / "helm" / "values-full.yaml"
# With these, the chart's names are k8s/webhook's names.
RELEASE, NAMESPACE = "spiffe-oauth-sidecar", "spiffe-oauth-sidecar-system"
# Labels the chart adds for Helm's bookkeeping; k8s/webhook has no use for them.
HELM_LABELS = {
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}


def helm_version() -> str:
    found = re.search(r"^\thelm\.sh/helm/v3 (v[0-9][0-9.]*)", (TOOL / "go.mod").read_text(), re.M)
    assert found, "tests/helm/tool/go.mod pins no helm.sh/helm/v3 version"
    return found.group(1)


@pytest.fixture(scope="session")
def helm() -> Path:
    # The Makefile's INTEROP_CACHE, shared with the interop peers.
    binary = cache_dir() / f"helm-{helm_version()}" / "helm"
    if not os.access(binary, os.X_OK):
        missing(f"helm {helm_version()} is not built at {binary}: run `make helm` (needs Go)")
    return binary


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Offline, and nothing read from or written to the user's helm setup.
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": "/nonexistent",
        "HELM_CACHE_HOME": "/nonexistent/cache",
        "HELM_CONFIG_HOME": "/nonexistent/config",
        "HELM_DATA_HOME": "/nonexistent/data",
    }
    return subprocess.run(  # noqa: S603 - our pinned binary, fixed arguments
        [str(helm), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def render(helm: Path, *args: str, kube: str = "1.29.0") -> list[dict[str, Any]]:
    done = run_helm(
        helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", kube, *args
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


def refused(helm: Path, *args: str, kube: str = "1.29.0") -> str:
    done = run_helm(
        helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", kube, *args
    )
    assert done.returncode != 0, f"rendered: {done.stdout[:400]}"
    return done.stderr


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    keyed = {
        (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", "")): d for d in docs
    }
    assert len(keyed) == len(docs), "two objects share a kind, name and namespace"
    return {(kind, name): doc for (kind, name, _), doc in keyed.items()}


@pytest.fixture(scope="session")
def webhook_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    where = tmp_path_factory.mktemp("webhook-tls")
    ca = DevCA()
    cert, key = ca.issue_server(f"spiffe-oauth-sidecar-webhook.{NAMESPACE}.svc").write(
        where, "webhook"
    )
    return cert, key, ca.write_ca(where / "ca.crt")


# -- lint and schemas ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, VALUES_FULL], ids=["default", "full"])
def test_helm_lint_passes_strictly(helm: Path, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART), "--kube-version", "1.29.0"]
    done = run_helm(helm, *args, *(["-f", str(values)] if values else []))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def rendered_variants(helm: Path, ca: tuple[Path, Path, Path]) -> Iterator[tuple[str, Any]]:
    cert, key, ca_pem = ca
    provided = [
        "--set=certificate.certManager.enabled=false",
        f"--set-file=certificate.provided.cert={cert}",
        f"--set-file=certificate.provided.key={key}",
        f"--set-file=certificate.provided.caCert={ca_pem}",
    ]
    for kube in ("1.29.0", "1.37.0"):
        yield f"default@{kube}", render(helm, kube=kube)
        yield f"full@{kube}", render(helm, "-f", str(VALUES_FULL), kube=kube)
    yield "provided", render(helm, "-f", str(VALUES_FULL), *provided)


def test_every_rendered_manifest_validates_strictly(
    helm: Path, webhook_ca: tuple[Path, Path, Path]
) -> None:
    kinds: set[str] = set()
    for variant, docs in rendered_variants(helm, webhook_ca):
        assert docs, variant
        for doc in docs:
            kinds.add(doc["kind"])
            try:
                validate(doc)
            except Exception as exc:
                raise AssertionError(f"{variant}: {doc['kind']} {doc['metadata']['name']}") from exc
    assert kinds == {
        "ServiceAccount",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
        "Issuer",
        "Certificate",
        "Secret",
        "ConfigMap",
        "PodMonitor",
    }


# -- the default rendering is k8s/webhook ---------------------------------------------------------


def _is_label_map(key: str, value: Any) -> bool:
    # metadata.labels, a label selector's matchLabels, a Service's selector
    return (
        key in ("labels", "matchLabels", "selector")
        and isinstance(value, dict)
        and all(isinstance(v, str) for v in value.values())
    )


def _strip_helm_labels(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                {n: v for n, v in value.items() if n not in HELM_LABELS}
                if _is_label_map(k, value)
                else _strip_helm_labels(value)
            )
            for k, value in node.items()
        }
    if isinstance(node, list):
        return [_strip_helm_labels(item) for item in node]
    return node


def _webhook_options(args: list[str]) -> dict[str, Any]:
    parsed = vars(build_parser().parse_args(args))
    parsed.pop("func")
    return parsed


def substance(doc: dict[str, Any], reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the API server acts on: Helm's bookkeeping labels dropped, the webhook's arguments
    as the CLI parses them, the pull policy the API server defaults a tagged image to."""
    doc = _strip_helm_labels(copy.deepcopy(doc))
    if reference is not None:
        # The chart labels objects kustomize leaves unlabelled (the same name label).
        labels = doc["metadata"].get("labels", {})
        wanted = reference["metadata"].get("labels", {})
        assert wanted.items() <= labels.items(), (doc["kind"], labels, wanted)
        doc["metadata"]["labels"] = dict(wanted)
        if not wanted:
            del doc["metadata"]["labels"]
    if doc["kind"] == "Deployment":
        for container in doc["spec"]["template"]["spec"]["containers"]:
            container["args"] = _webhook_options(container["args"])
            if container.get("imagePullPolicy") == "IfNotPresent":
                assert not container["image"].endswith(":latest")
                del container["imagePullPolicy"]
    return doc


def test_the_default_rendering_is_k8s_webhook_in_substance(helm: Path) -> None:
    chart = by_kind(render(helm))
    files = sorted((K8S / "webhook").glob("*.yaml"))
    kustomize = by_kind([d for p in files if p.name != "kustomization.yaml" for d in load_docs(p)])
    # A chart installs into a namespace it does not own (`helm install -n ... --create-namespace`);
    # docs/kubernetes.md says to label it for the restricted Pod Security level.
    namespace = kustomize.pop(("Namespace", NAMESPACE))
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert set(chart) == set(kustomize)
    for key, reference in kustomize.items():
        assert substance(chart[key], reference) == substance(reference), key


def test_substance_still_sees_a_real_difference(helm: Path) -> None:
    """The normalisation hides bookkeeping only: a changed setting is still a difference."""
    (reference,) = load_docs(K8S / "webhook" / "deployment.yaml")
    for setting in ("webhook.replicas=3", "injection.image=registry.example/other:1"):
        chart = by_kind(render(helm, f"--set={setting}"))
        assert substance(chart[("Deployment", reference["metadata"]["name"])], reference) != (
            substance(reference)
        ), setting


# -- values ----------------------------------------------------------------------------------------


def test_the_full_values_reach_the_objects(helm: Path) -> None:
    docs = by_kind(render(helm, "-f", str(VALUES_FULL)))
    values = yaml.safe_load(VALUES_FULL.read_text())
    webhook = f"{RELEASE}-webhook"
    deployment = docs[("Deployment", webhook)]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"{values['image']['repository']}@{values['image']['digest']}"
    options = _webhook_options(container["args"])
    assert options["image"] == values["injection"]["image"]
    assert options["config_map"] == "egress-sidecar"
    assert options["listen"] == "0.0.0.0:9443"
    assert container["ports"][0]["containerPort"] == 9443
    assert container["resources"] == values["webhook"]["resources"]
    assert pod["serviceAccountName"] == "sos-webhook"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert "topologySpreadConstraints" not in pod
    assert pod["tolerations"] == values["webhook"]["tolerations"]
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {
        "example.com/team": "platform"
    }
    assert docs[("PodDisruptionBudget", webhook)]["spec"]["minAvailable"] == 2

    (hook,) = docs[("MutatingWebhookConfiguration", RELEASE)]["webhooks"]
    assert hook["namespaceSelector"] == values["injection"]["namespaceSelector"]
    assert hook["objectSelector"] == {"matchLabels": {"egress": "oauth"}}
    assert (hook["failurePolicy"], hook["timeoutSeconds"]) == ("Ignore", 3)
    assert hook["clientConfig"]["service"]["namespace"] == NAMESPACE

    certificate = docs[("Certificate", webhook)]["spec"]
    assert certificate["issuerRef"] == {"name": "internal-ca", "kind": "ClusterIssuer"}
    assert ("Issuer", f"{RELEASE}-selfsigned") not in docs  # an issuer was named

    monitor = docs[("PodMonitor", RELEASE)]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["billing", "payments"]}
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "sidecar-admin", "path": "/metrics", "interval": "15s"}
    ]


def test_the_sidecar_configmaps_hold_a_valid_config_in_each_namespace(helm: Path) -> None:
    env = {"SIDECAR_LISTEN": "127.0.0.1:15001", "SIDECAR_ADMIN": "0.0.0.0:15000"}
    maps = [d for d in render(helm, "-f", str(VALUES_FULL)) if d["kind"] == "ConfigMap"]
    assert sorted(m["metadata"]["namespace"] for m in maps) == ["billing", "payments"]
    for configmap in maps:
        assert configmap["metadata"]["name"] == "egress-sidecar"
        cfg = config.parse(yaml.safe_load(configmap["data"]["sidecar.yaml"]), env=env)
        assert [d.host for d in cfg.destinations] == ["ledger.example.com"]
    # The chart's default config is k8s/base's, so the two installs start alike.
    (base,) = load_docs(K8S / "base" / "configmap.yaml")
    (default,) = [
        d
        for d in render(helm, "--set=sidecarConfig.namespaces={billing}")
        if d["kind"] == "ConfigMap"
    ]
    assert yaml.safe_load(default["data"]["sidecar.yaml"]) == yaml.safe_load(
        base["data"]["sidecar.yaml"]
    )
    assert not [d for d in render(helm) if d["kind"] == "ConfigMap"]  # no namespace listed


def test_a_provided_certificate_is_stored_and_trusted(
    helm: Path, webhook_ca: tuple[Path, Path, Path]
) -> None:
    cert, key, ca_pem = webhook_ca
    docs = by_kind(
        render(
            helm,
            "--set=certificate.certManager.enabled=false",
            f"--set-file=certificate.provided.cert={cert}",
            f"--set-file=certificate.provided.key={key}",
            f"--set-file=certificate.provided.caCert={ca_pem}",
        )
    )
    webhook = f"{RELEASE}-webhook"
    assert ("Certificate", webhook) not in docs
    secret = docs[("Secret", f"{webhook}-tls")]
    assert secret["type"] == "kubernetes.io/tls"
    assert base64.b64decode(secret["data"]["tls.crt"]) == cert.read_bytes()
    assert base64.b64decode(secret["data"]["tls.key"]) == key.read_bytes()
    configuration = docs[("MutatingWebhookConfiguration", RELEASE)]
    assert "annotations" not in configuration["metadata"]  # no cert-manager CA injection
    (hook,) = configuration["webhooks"]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca_pem.read_bytes()
    pod = docs[("Deployment", webhook)]["spec"]["template"]
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == f"{webhook}-tls"
    assert re.fullmatch(r"[0-9a-f]{64}", pod["metadata"]["annotations"]["checksum/tls"])

    existing = by_kind(
        render(
            helm,
            "--set=certificate.certManager.enabled=false",
            "--set=certificate.provided.existingSecret=webhook-serving",
            f"--set-file=certificate.provided.caCert={ca_pem}",
        )
    )
    assert not [k for k in existing if k[0] in ("Secret", "Certificate", "Issuer")]
    pod = existing[("Deployment", webhook)]["spec"]["template"]
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == "webhook-serving"
    assert "annotations" not in pod["metadata"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set=webhook.replicass=1"], "additional properties 'replicass' not allowed"),
        (["--set=injection.failurePolicy=Sometimes"], "/injection/failurePolicy"),
        (["--set=sidecarConfig.namespaces={Billing}"], "/sidecarConfig/namespaces/0"),
        (["--set=image.digest=latest"], "/image/digest"),
        (
            ["--set=certificate.certManager.enabled=false"],
            "certificate.provided.cert (PEM) or .existingSecret is required",
        ),
        (
            [
                "--set=certificate.certManager.enabled=false",
                "--set=certificate.provided.existingSecret=webhook-serving",
            ],
            "certificate.provided.caCert (PEM) is required",
        ),
        (
            ["--set=certificate.certManager.enabled=false", "--set=certificate.provided.cert=x"],
            "/certificate/provided/cert",
        ),
        (
            ["--set-string=sidecarConfig.sidecarYaml=a: [b"],
            "sidecarConfig.sidecarYaml is not valid",
        ),
    ],
)
def test_values_it_cannot_install_safely_are_refused(
    helm: Path, args: list[str], message: str
) -> None:
    assert message in refused(helm, *args)


def test_the_chart_refuses_clusters_without_native_sidecars(helm: Path) -> None:
    assert "incompatible with Kubernetes v1.28.0" in refused(helm, kube="1.28.0")
