"""Kubernetes: manifests and `sidecar inject` output validate offline against the API schemas;
injection is idempotent and honours annotations; the webhook answers real AdmissionReviews over
HTTPS with a patch that yields exactly what `inject` writes."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate
import pytest
import yaml

from sidecar import config
from sidecar.cli import main
from sidecar.devstack.pki import DevCA
from sidecar.kube.inject import (
    CONTAINER,
    DEFAULTS,
    InjectError,
    inject_documents,
    inject_object,
)
from sidecar.kube.webhook import (
    MAX_REVIEW_BYTES,
    ReloadingCertificate,
    WebhookServer,
    json_patch,
    review,
)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# The oldest version with native sidecars (restartPolicy on init containers) and the newest.
VERSIONS = ("1.29.0", "1.37.0")
CUSTOM_KINDS = {
    ("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID"): ("spiffeIDTemplate", "podSelector"),
    ("cert-manager.io/v1", "Certificate"): ("secretName", "dnsNames", "issuerRef"),
    ("cert-manager.io/v1", "Issuer"): ("selfSigned",),
    # The Prometheus Operator's CRD; promtool checks the rules themselves (test_prometheusrule).
    ("monitoring.coreos.com/v1", "PrometheusRule"): ("groups",),
    ("monitoring.coreos.com/v1", "PodMonitor"): ("selector", "podMetricsEndpoints"),
}


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield f"{path.relative_to(ROOT)}#{index}", doc


def validate(doc: dict[str, Any]) -> None:
    custom = CUSTOM_KINDS.get((doc.get("apiVersion"), doc.get("kind")))
    if custom is not None:  # CRDs: no offline schema; check what their controllers require
        assert doc["metadata"]["name"]
        assert set(custom) <= set(doc["spec"]), f"{doc['kind']} needs {custom}"
        return
    for version in VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    kind = obj["kind"]
    if kind == "Pod":
        return dict(obj["spec"])
    if kind == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(obj["spec"]["template"]["spec"])


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# -- manifests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "doc"), list(manifests()), ids=lambda v: str(v)[:60])
def test_every_manifest_validates_strictly(where: str, doc: dict[str, Any]) -> None:
    validate(doc)


def test_kustomizations_list_every_manifest_and_only_existing_ones() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text())
        listed = set()
        for entry in doc["resources"]:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization}: {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists()
            listed.add(target)
        siblings = {p.resolve() for p in kustomization.parent.glob("*.yaml")}
        siblings.discard(kustomization.resolve())
        assert siblings <= listed, f"{kustomization}: not listed: {siblings - listed}"


def test_the_example_configmap_holds_a_valid_sidecar_config() -> None:
    (configmap,) = load_docs(K8S / "base" / "configmap.yaml")
    env = {"SIDECAR_LISTEN": "127.0.0.1:15001", "SIDECAR_ADMIN": "0.0.0.0:15000"}
    cfg = config.parse(yaml.safe_load(configmap["data"]["sidecar.yaml"]), env=env)
    assert cfg.spiffe_socket == "unix:///spiffe-workload-api/spire-agent.sock"
    assert [d.host for d in cfg.destinations] == ["api.vendor.example"]


def test_the_committed_example_is_what_inject_writes_today() -> None:
    plain = load_docs(K8S / "examples" / "plain" / "legacy-invoicer.yaml")
    committed = load_docs(K8S / "examples" / "app" / "deployment.yaml")
    assert inject_documents(plain) == committed, "run `make k8s-examples`"
    assert inject_documents(committed) == committed


# -- inject ----------------------------------------------------------------------------------------


@pytest.fixture
def workloads() -> list[Any]:
    return load_docs(K8S / "examples" / "plain" / "workloads.yaml")


def test_inject_output_validates_and_injecting_twice_changes_nothing(workloads: list[Any]) -> None:
    once = inject_documents(workloads)
    for doc in once:
        validate(doc)
    assert inject_documents(once) == once
    assert inject_documents(copy.deepcopy(once)) == once


def test_injected_pods_run_the_sidecar_as_a_locked_down_native_sidecar(
    workloads: list[Any],
) -> None:
    injected = {d["metadata"]["name"]: d for d in inject_documents(workloads)}
    for name in ("ledger", "node-reporter", "backfill", "nightly-export"):
        spec = pod_spec(injected[name])
        sidecar = spec["initContainers"][0]
        assert sidecar["name"] == CONTAINER
        assert sidecar["restartPolicy"] == "Always"
        assert sidecar["args"] == ["run"]
        sc = sidecar["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert sidecar[probe]["httpGet"]["port"] == "sidecar-admin"
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["spiffe-workload-api"]["csi"] == {
            "driver": "csi.spiffe.io",
            "readOnly": True,
        }
        mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
        assert mounts["spiffe-workload-api"]["readOnly"] is True
        sidecar_env = env_of(sidecar)
        assert sidecar_env["SPIFFE_ENDPOINT_SOCKET"].startswith("unix:///spiffe-workload-api/")
        for app in spec["containers"]:
            app_env = env_of(app)
            assert app_env["HTTP_PROXY"] == app_env["http_proxy"] == "http://127.0.0.1:15001"
            assert ".svc.cluster.local" in app_env["NO_PROXY"].split(",")
            assert "HTTPS_PROXY" not in app_env  # TLS the app makes itself is not ours to route


def test_annotations_tune_the_injection_and_can_opt_out(workloads: list[Any]) -> None:
    injected = {d["metadata"]["name"]: d for d in inject_documents(workloads)}
    pod = pod_spec(injected["one-off"])
    sidecar = pod["initContainers"][0]
    assert env_of(sidecar)["SIDECAR_LISTEN"] == "127.0.0.1:16001"
    assert env_of(sidecar)["SIDECAR_ADMIN"] == "0.0.0.0:16000"
    assert env_of(pod["containers"][0])["HTTP_PROXY"] == "http://127.0.0.1:16001"
    ledger = pod_spec(injected["ledger"])
    volumes = {v["name"]: v for v in ledger["volumes"]}
    assert volumes["spiffe-oauth-sidecar-config"]["configMap"]["name"] == "ledger-sidecar"
    assert ledger["initContainers"][0]["resources"]["limits"]["memory"] == "256Mi"
    original = {d["metadata"]["name"]: d for d in workloads}
    assert injected["opted-out"] == original["opted-out"]
    assert injected["ledger"]["kind"] == "StatefulSet"
    services = [d for d in inject_documents(workloads) if d["kind"] == "Service"]
    assert services == [d for d in workloads if d["kind"] == "Service"]


def test_reinjection_after_an_annotation_change_updates_in_place(workloads: list[Any]) -> None:
    (pod,) = inject_documents(workloads[:1])
    pod["metadata"]["annotations"]["spiffe-oauth-sidecar.io/port"] = "17001"
    (again,) = inject_documents([pod])
    spec = pod_spec(again)
    assert [c["name"] for c in spec["initContainers"]] == [CONTAINER]
    assert [v["name"] for v in spec["volumes"]].count("spiffe-workload-api") == 1
    assert env_of(spec["containers"][0])["HTTP_PROXY"] == "http://127.0.0.1:17001"
    assert [e["name"] for e in spec["containers"][0]["env"]].count("HTTP_PROXY") == 1


def _pod(**spec: Any) -> dict[str, Any]:
    base = {"containers": [{"name": "app", "image": "app:1"}], **spec}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": base}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_pod(hostNetwork=True), "document 1 (Pod p): hostNetwork pods"),
        (_pod(containers=[{"name": CONTAINER, "image": "x"}]), "already among the app containers"),
        (_pod(containers=[]), "the pod has no containers"),
        ({"kind": "Deployment", "metadata": {"name": "d"}, "spec": {}}, "spec.template is missing"),
        (["not", "an", "object"], "document 1: is not a Kubernetes object"),
        (
            {
                **_pod(),
                "metadata": {"name": "p", "annotations": {"spiffe-oauth-sidecar.io/prot": "1"}},
            },
            "unknown annotation spiffe-oauth-sidecar.io/prot",
        ),
        (
            {
                **_pod(),
                "metadata": {"name": "p", "annotations": {"spiffe-oauth-sidecar.io/port": "x"}},
            },
            "must be a port number",
        ),
        (
            {
                **_pod(),
                "metadata": {
                    "name": "p",
                    "annotations": {"spiffe-oauth-sidecar.io/admin-port": "15001"},
                },
            },
            "must differ",
        ),
    ],
)
def test_input_it_cannot_inject_safely_is_a_clear_error(doc: Any, message: str) -> None:
    with pytest.raises(InjectError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inject_documents([doc])


def test_inject_command_reads_files_and_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = K8S / "examples" / "plain" / "workloads.yaml"
    assert main(["inject", "-f", str(source)]) == 0
    out = capsys.readouterr().out
    assert [d for d in yaml.safe_load_all(out) if d] == inject_documents(load_docs(source))

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_pod(hostNetwork=True)) + "---\n: [unclosed\n")
    assert main(["inject", "-f", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing half-written
    assert "not valid YAML" in captured.err
    assert "unclosed" not in captured.err  # where, not what: the file may hold Secrets

    bad.write_text(yaml.safe_dump(_pod(hostNetwork=True)))
    assert main(["inject", "-f", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "hostNetwork" in captured.err

    monkeypatch.setattr("sys.stdin", io.StringIO(yaml.safe_dump(_pod())))
    assert main(["inject", "-f", "-", "--image", "registry.example/sidecar:9"]) == 0
    (doc,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert doc["spec"]["initContainers"][0]["image"] == "registry.example/sidecar:9"


# -- webhook ---------------------------------------------------------------------------------------


def admission_review(pod: Any, *, kind: str = "Pod", operation: str = "CREATE") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "billing",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
        },
    }


@pytest.fixture
def webhook_tls(tmp_path: Path) -> tuple[DevCA, Path, Path]:
    ca = DevCA()
    cert, key = ca.issue_server("localhost", "127.0.0.1").write(tmp_path, "webhook")
    return ca, cert, key


@pytest.fixture
async def webhook(webhook_tls: tuple[DevCA, Path, Path]) -> AsyncIterator[tuple[str, Any]]:
    ca, cert, key = webhook_tls
    server = WebhookServer(ReloadingCertificate(cert, key), host="127.0.0.1", port=0)
    await server.start()
    client_ssl = ca.client_context()
    async with aiohttp.ClientSession() as session:

        async def post(body: Any) -> tuple[int, Any]:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with session.post(
                f"https://127.0.0.1:{server.port}/mutate",
                data=io.BytesIO(data),  # large bodies: aiohttp wants a stream
                headers={"Content-Type": "application/json"},
                ssl=client_ssl,
            ) as resp:
                return resp.status, await resp.json()

        yield f"https://127.0.0.1:{server.port}", post
    await server.stop()


def apply(pod: Any, response: dict[str, Any]) -> Any:
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, patch)


async def test_webhook_patch_gives_exactly_what_inject_writes(
    webhook: tuple[str, Any], workloads: list[Any]
) -> None:
    _, post = webhook
    templates = [d for d in workloads if d["kind"] in ("Pod", "StatefulSet", "DaemonSet")]
    for workload in templates:
        # The API server reviews the Pod a controller creates from the template.
        if workload["kind"] == "Pod":
            pod = workload
        else:
            template = workload["spec"]["template"]
            pod = {"apiVersion": "v1", "kind": "Pod", **copy.deepcopy(template)}
        status, answer = await post(admission_review(pod))
        assert status == 200
        response = answer["response"]
        assert answer["kind"] == "AdmissionReview"
        assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
        assert response["allowed"] is True
        patched = apply(pod, response)
        assert patched == inject_object(pod)
        validate(patched)
        # Reinvocation (reinvocationPolicy: IfNeeded) on the patched pod: no further patch.
        status, again = await post(admission_review(patched))
        assert again["response"]["allowed"] is True
        assert "patch" not in again["response"]


async def test_webhook_denies_what_it_cannot_inject_and_admits_opt_outs(
    webhook: tuple[str, Any],
) -> None:
    _, post = webhook
    status, answer = await post(admission_review(_pod(hostNetwork=True)))
    assert status == 200
    assert answer["response"]["allowed"] is False
    assert "hostNetwork" in answer["response"]["status"]["message"]

    opted_out = _pod()
    opted_out["metadata"]["annotations"] = {"spiffe-oauth-sidecar.io/inject": "false"}
    status, answer = await post(admission_review(opted_out))
    assert answer["response"] == {"uid": answer["response"]["uid"], "allowed": True}

    status, answer = await post(admission_review({"kind": "Service"}, kind="Service"))
    assert answer["response"]["allowed"] is True
    assert "patch" not in answer["response"]
    assert answer["response"]["warnings"]

    status, answer = await post(admission_review(_pod(), operation="UPDATE"))
    assert "patch" not in answer["response"]


async def test_webhook_refuses_malformed_reviews_with_400(webhook: tuple[str, Any]) -> None:
    _, post = webhook
    for body in (
        b"{not json",
        {"kind": "AdmissionReview"},
        [1, 2],
        {**admission_review(_pod()), "request": {}},
    ):
        status, answer = await post(body)
        assert status == 400
        assert answer["error"] == "bad_request"


def test_review_is_pure_and_keeps_the_uid() -> None:
    answer = review(admission_review(_pod()), DEFAULTS)
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"


async def test_webhook_picks_up_a_renewed_certificate(
    webhook_tls: tuple[DevCA, Path, Path], tmp_path: Path
) -> None:
    ca, cert, key = webhook_tls
    certificate = ReloadingCertificate(cert, key)
    server = WebhookServer(certificate, host="127.0.0.1", port=0)
    await server.start()
    try:
        first = await _served_certificate(server.port, ca.client_context())
        assert certificate.reload_if_changed() is False
        renewed = ca.issue_server("localhost", "127.0.0.1")
        renewed.write(tmp_path, "webhook")  # both files replaced, as a renewal does
        assert certificate.reload_if_changed() is True
        second = await _served_certificate(server.port, ca.client_context())
    finally:
        await server.stop()
    assert first != second


async def _served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return bytes(der)
    finally:
        writer.close()


# -- webhook bounds (issue 15) ----------------------------------------------------------------


async def test_webhook_refuses_malformed_kinds_and_deep_nesting_with_400(
    webhook: tuple[str, Any],
) -> None:
    _, post = webhook
    for kind in ("Pod", ["Pod"], 7):
        body = admission_review(_pod())
        body["request"]["kind"] = kind
        status, answer = await post(body)
        assert (status, answer["error"]) == (400, "bad_request"), kind
    deep = b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": '
    deep += b'{"uid": "u", "object": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    status, answer = await post(deep)
    assert (status, answer["error"]) == (400, "bad_request")
    # Deep enough for copying or walking the pod to exceed the recursion limit, shallow enough
    # for the JSON parser: the review itself must fail cleanly.
    pod = _pod()
    pod["metadata"]["labels"] = "DEEP"
    text = json.dumps(admission_review(pod)).replace('"DEEP"', '{"x": ' * 900 + "{}" + "}" * 900)
    status, answer = await post(text.encode())
    assert (status, answer["error"]) == (400, "bad_request")


async def test_webhook_refuses_oversized_reviews_with_413(webhook: tuple[str, Any]) -> None:
    _, post = webhook
    pod = _pod()
    pod["metadata"]["annotations"] = {"pad": "x" * (MAX_REVIEW_BYTES + 1)}
    status, answer = await post(admission_review(pod))
    assert status == 413
    assert "larger than" in answer["detail"]


async def test_a_huge_pod_does_not_stall_the_event_loop(webhook: tuple[str, Any]) -> None:
    _, post = webhook
    pod = _pod(containers=[{"name": f"c{i}", "image": "app:1"} for i in range(40_000)])
    body = json.dumps(admission_review(pod)).encode()
    assert len(body) < MAX_REVIEW_BYTES
    beats = 0
    done = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal beats
        while not done.is_set():
            beats += 1
            await asyncio.sleep(0.001)

    ticking = asyncio.create_task(heartbeat())
    try:
        status, answer = await post(body)
    finally:
        done.set()
        await ticking
    assert status == 200
    patched = apply(pod, answer["response"])
    assert patched == inject_object(pod)
    # The review ran off the loop: the loop kept turning meanwhile (a loop blocked for the
    # whole review would tick a handful of times: before and after).
    assert beats >= 50


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"a": 1}, {"a": 1, "b/c~d": [1]}),
        ({"a": [1, 2], "b": {"c": True}}, {"a": [1, 2, 3], "b": {"c": 1}}),
        ({"a": [{"x": 1}, {"y": 2}]}, {"a": [{"x": 1}, {"y": 3, "z": None}]}),
        ({"a": 1, "b": 2}, {"b": 2}),
        ({"a": "s"}, {"a": {"s": 1}}),
    ],
)
def test_the_structural_patch_applies_to_exactly_the_target(before: Any, after: Any) -> None:
    assert jsonpatch.apply_patch(before, json_patch(before, after)) == after
    assert json_patch(after, after) == []
