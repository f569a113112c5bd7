"""`sidecar inject --transparent` and the transparent annotations: the init container that
installs the capture rules (the sidecar image, root with NET_ADMIN and NET_RAW only, before the
sidecar), the sidecar's UID being the one the rules exclude, and the committed example."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import yaml

from sidecar import config
from sidecar.cli import main
from sidecar.kube.inject import (
    CONTAINER,
    DEFAULTS,
    RULES_CONTAINER,
    InjectError,
    inject_documents,
    inject_object,
)
from tests.test_kubernetes import K8S, env_of, load_docs, pod_spec, validate

PLAIN = K8S / "examples" / "plain" / "legacy-invoicer.yaml"


def transparent(**annotations: str) -> dict[str, Any]:
    (loaded,) = load_docs(PLAIN)
    doc: dict[str, Any] = copy.deepcopy(loaded)
    chosen = {"spiffe-oauth-sidecar.io/transparent": "true", **annotations}
    doc["spec"]["template"]["metadata"]["annotations"] = chosen
    return doc


def test_the_rules_run_first_as_root_with_net_admin_and_net_raw_only() -> None:
    injected = inject_object(transparent())
    validate(injected)
    spec = pod_spec(injected)
    rules, sidecar = spec["initContainers"][:2]
    assert (rules["name"], sidecar["name"]) == (RULES_CONTAINER, CONTAINER)
    assert rules["image"] == sidecar["image"]  # the sidecar image carries iptables
    security = rules["securityContext"]
    assert security["runAsUser"] == 0
    assert security["runAsNonRoot"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert "restartPolicy" not in rules  # a plain init container: done before the app starts
    args = rules["args"]
    assert args[:2] == ["iptables", "install"]
    uid = int(args[args.index("--uid") + 1])
    assert uid == sidecar["securityContext"]["runAsUser"]  # the sidecar is never captured
    assert args[args.index("--port") + 1] == "15006"
    assert env_of(sidecar)["SIDECAR_TRANSPARENT"] == "127.0.0.1:15006"
    assert inject_object(injected) == injected  # twice: the same


def test_annotations_add_exclusions_and_turning_it_off_removes_the_init_container() -> None:
    doc = transparent(
        **{
            "spiffe-oauth-sidecar.io/transparent-port": "15090",
            "spiffe-oauth-sidecar.io/transparent-exclude-uids": "1337",
            "spiffe-oauth-sidecar.io/transparent-exclude-cidrs": "10.96.0.0/12, fd00::/8",
        }
    )
    injected = inject_object(doc)
    args = pod_spec(injected)["initContainers"][0]["args"]
    assert args[-8:] == [
        "--port", "15090", "--exclude-uid", "1337",
        "--exclude-cidr", "10.96.0.0/12", "--exclude-cidr", "fd00::/8",
    ]  # fmt: skip
    off = copy.deepcopy(injected)
    off["spec"]["template"]["metadata"]["annotations"]["spiffe-oauth-sidecar.io/transparent"] = (
        "false"
    )
    spec = pod_spec(inject_object(off))
    assert [c["name"] for c in spec["initContainers"]] == [CONTAINER]
    assert "SIDECAR_TRANSPARENT" not in env_of(spec["initContainers"][0])
    assert all("xtables" not in v["name"] for v in spec["volumes"])


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"spiffe-oauth-sidecar.io/transparent": "yes"}, "true or false"),
        ({"spiffe-oauth-sidecar.io/transparent-port": "15001"}, "must differ"),
        ({"spiffe-oauth-sidecar.io/transparent-exclude-uids": "root"}, "numeric UIDs"),
        ({"spiffe-oauth-sidecar.io/transparent-exclude-cidrs": "10.0.0.0/40"}, "not an IP network"),
    ],
)
def test_bad_transparent_annotations_are_clear_errors(
    annotations: dict[str, str], message: str
) -> None:
    with pytest.raises(InjectError, match=message):
        DEFAULTS.with_annotations({"spiffe-oauth-sidecar.io/transparent": "true", **annotations})


def test_the_inject_flag_and_the_committed_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(PLAIN.read_text()))
    assert main(["inject", "-f", "-", "--transparent"]) == 0
    (written,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert pod_spec(written)["initContainers"][0]["name"] == RULES_CONTAINER
    plain = load_docs(K8S / "examples" / "plain" / "legacy-invoicer-transparent.yaml")
    committed = load_docs(K8S / "examples" / "transparent" / "deployment.yaml")
    assert inject_documents(plain) == committed, "run `make k8s-examples`"


def test_the_injected_environment_turns_the_transparent_listener_on() -> None:
    (configmap,) = load_docs(K8S / "base" / "configmap.yaml")
    doc = yaml.safe_load(configmap["data"]["sidecar.yaml"])
    env = {"SIDECAR_LISTEN": "127.0.0.1:15001", "SIDECAR_TRANSPARENT": "127.0.0.1:15006"}
    cfg = config.parse(doc, env=env)
    assert cfg.transparent == config.Transparent(config.Address("127.0.0.1", 15006))
    assert config.parse(doc, env={"SIDECAR_LISTEN": "127.0.0.1:15001"}).transparent is None
