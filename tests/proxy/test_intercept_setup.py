"""Setting interception up: the config options, `sidecar inject` / the webhook's mutation for
opted-in workloads (HTTPS_PROXY, the CA volume, the trust variables, JAVA_TOOL_OPTIONS merged),
and `sidecar ca` for hand setups."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from sidecar import config
from sidecar.cli import main
from sidecar.devstack.stack import DevStack
from sidecar.errors import ConfigError
from sidecar.kube.inject import (
    CA_DIR,
    CA_VOLUME,
    CONTAINER,
    JAVA_TRUST,
    TRUST_BUNDLE,
    TRUST_CA,
    TRUST_DIR,
    TRUST_VOLUME,
    Options,
    inject_object,
)
from tests.test_kubernetes import env_of, validate


def problems(doc: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(doc, env=env or {})
    return info.value.problems


def test_config_intercept_options(stack: DevStack, tmp_path: Path) -> None:
    doc = stack.sidecar_config(
        destination={"intercept": True},
        intercept={"ca_dir": str(tmp_path / "ca"), "export_dir": str(tmp_path / "trust")},
    )
    cfg = config.parse(doc, env={})
    assert cfg.destinations[0].intercept is True
    assert cfg.intercept_hosts == ("api.saas.example",)
    assert cfg.intercept.ca_dir == tmp_path / "ca"
    assert cfg.intercept.leaf_hours == 12.0
    # The pod spec's variables (set by `sidecar inject`) override the shared ConfigMap's.
    env = {"SIDECAR_CA_DIR": "/var/ca", "SIDECAR_TRUST_DIR": "/var/trust"}
    cfg = config.parse(stack.sidecar_config(destination={"intercept": True}), env=env)
    assert (cfg.intercept.ca_dir, cfg.intercept.export_dir) == (Path("/var/ca"), Path("/var/trust"))
    # Default: credential routes do not intercept (docs/https.md says why).
    assert config.parse(stack.sidecar_config(), env={}).intercept_hosts == ()


def test_config_refuses_unsafe_or_contradictory_interception(stack: DevStack) -> None:
    doc = stack.sidecar_config(
        intercept={"ca_dir": "/shared/ca", "export_dir": "/shared", "leaf_hours": 1000},
    )
    doc["destinations"].append(
        {"name": "pipe", "host": "pipe.example", "tunnel": True, "intercept": True}
    )
    doc["destinations"].append(
        {"name": "ip", "host": "10.1.2.3", "authorization_server": "dev", "intercept": True}
    )
    found = problems(doc)
    assert "destinations[1].intercept: a tunnel route is a blind pipe" in " ".join(found)
    assert any(
        p.startswith("destinations[2].intercept: interception needs a host name") for p in found
    )
    assert any(p.startswith("intercept.export_dir: the app mounts export_dir") for p in found)
    assert any(p.startswith("intercept.leaf_hours: ") for p in found)
    both = stack.sidecar_config(intercept={"ca_dir": "/a", "ca_from": "/b"})
    assert any(p.startswith("intercept.ca_dir: a provided CA") for p in problems(both))


# -- inject ----------------------------------------------------------------------------------------


def deployment(env: list[dict[str, Any]] | None = None, intercept: str = "true") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app"},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {
                "metadata": {
                    "labels": {"app": "x"},
                    "annotations": {"spiffe-oauth-sidecar.io/intercept": intercept},
                },
                "spec": {"containers": [{"name": "app", "image": "app:1", "env": env or []}]},
            },
        },
    }


def test_inject_gives_an_opted_in_app_the_ca_and_the_trust_variables() -> None:
    injected = inject_object(deployment())
    validate(injected)
    assert inject_object(injected) == injected  # idempotent
    spec = injected["spec"]["template"]["spec"]
    app = spec["containers"][0]
    env = env_of(app)
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:15001"
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == env["CURL_CA_BUNDLE"]
    assert env["SSL_CERT_FILE"] == TRUST_BUNDLE
    assert env["NODE_EXTRA_CA_CERTS"] == TRUST_CA
    assert env["JAVA_TOOL_OPTIONS"] == JAVA_TRUST
    assert "trustStoreType=PKCS12" in JAVA_TRUST
    # The app mounts the trust volume read-only and never the CA key's volume.
    assert app["volumeMounts"] == [{"name": TRUST_VOLUME, "mountPath": TRUST_DIR, "readOnly": True}]
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == CONTAINER
    assert env_of(sidecar)["SIDECAR_CA_DIR"] == CA_DIR
    assert env_of(sidecar)["SIDECAR_TRUST_DIR"] == TRUST_DIR
    assert {m["name"] for m in sidecar["volumeMounts"]} >= {CA_VOLUME, TRUST_VOLUME}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[CA_VOLUME]
    assert "emptyDir" in volumes[TRUST_VOLUME]


def test_inject_merges_java_tool_options_and_keeps_an_apps_own_ca_file() -> None:
    own = [
        {"name": "JAVA_TOOL_OPTIONS", "value": "-Xmx512m -Dfoo=bar"},
        {"name": "REQUESTS_CA_BUNDLE", "value": "/etc/app/ca.pem"},
    ]
    injected = inject_object(deployment(own))
    env = env_of(injected["spec"]["template"]["spec"]["containers"][0])
    assert env["JAVA_TOOL_OPTIONS"] == f"-Xmx512m -Dfoo=bar {JAVA_TRUST}"
    assert env["REQUESTS_CA_BUNDLE"] == "/etc/app/ca.pem"
    assert inject_object(copy.deepcopy(injected)) == injected  # merged once, not twice
    chosen = [{"name": "JAVA_TOOL_OPTIONS", "value": "-Djavax.net.ssl.trustStore=/mine.p12"}]
    env = env_of(inject_object(deployment(chosen))["spec"]["template"]["spec"]["containers"][0])
    assert env["JAVA_TOOL_OPTIONS"] == "-Djavax.net.ssl.trustStore=/mine.p12"


def test_without_the_annotation_nothing_about_https_is_added() -> None:
    injected = inject_object(deployment(intercept="false"))
    spec = injected["spec"]["template"]["spec"]
    env = env_of(spec["containers"][0])
    assert "HTTPS_PROXY" not in env
    assert "SSL_CERT_FILE" not in env
    assert TRUST_VOLUME not in {v["name"] for v in spec["volumes"]}
    forced = inject_object(deployment(intercept="false"), Options(intercept=True))
    assert "HTTPS_PROXY" not in env_of(forced["spec"]["template"]["spec"]["containers"][0])


def test_inject_command_has_an_intercept_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = deployment()
    del plain["spec"]["template"]["metadata"]["annotations"]
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(plain))
    assert main(["inject", "-f", str(path), "--intercept"]) == 0
    (out,) = list(yaml.safe_load_all(capsys.readouterr().out))
    assert env_of(out["spec"]["template"]["spec"]["containers"][0])["HTTPS_PROXY"]


# -- sidecar ca ------------------------------------------------------------------------------------


def test_sidecar_ca_prints_and_writes_the_same_ca_the_sidecar_keeps(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = stack.sidecar_config(destination={"intercept": True}, intercept={"ca_dir": "ca"})
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["ca", "--config", str(path)]) == 0
    printed = capsys.readouterr().out.encode()
    kept = (tmp_path / "ca" / "ca.pem").read_bytes()
    assert printed == kept
    assert x509.load_pem_x509_certificate(printed).extensions.get_extension_for_class(
        x509.NameConstraints
    )
    assert main(["ca", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "ca.pem").read_bytes() == kept
    assert (tmp_path / "out" / "truststore.p12").exists()
    assert main(["ca", "--config", str(path), "--bundle"]) == 0
    assert capsys.readouterr().out.encode().endswith(kept)


def test_sidecar_ca_refuses_when_the_ca_lives_in_memory_only(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(stack.sidecar_config(destination={"intercept": True})))
    assert main(["ca", "--config", str(path)]) == 1
    assert "ca_dir is not set" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(stack.sidecar_config()))
    assert main(["ca", "--config", str(path)]) == 1
    assert "no route sets 'intercept: true'" in capsys.readouterr().err


def test_check_says_which_routes_intercept(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(stack.sidecar_config(destination={"intercept": True})))
    assert main(["check", "--config", str(path)]) == 0
    assert "https:// intercepted (pod CA)" in capsys.readouterr().out


async def test_a_provided_ca_that_cannot_be_read_stops_the_start_with_the_reason(
    stack: DevStack, tmp_path: Path
) -> None:
    from sidecar.runtime import Sidecar

    doc = stack.sidecar_config(
        destination={"intercept": True}, intercept={"ca_from": str(tmp_path / "missing")}
    )
    sidecar = Sidecar(config.parse(doc, env={}))
    with pytest.raises(ConfigError) as info:
        await sidecar.start()
    assert info.value.problems[0].startswith("intercept: ")
    assert "tls.crt" in info.value.problems[0]
    assert sidecar.proxy_address is None  # nothing was bound
