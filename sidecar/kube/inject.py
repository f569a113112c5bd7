"""Add the sidecar to Kubernetes workloads: one pure mutation shared by ``inject`` and the webhook.

The sidecar runs as a native sidecar (an init container with ``restartPolicy: Always``,
Kubernetes >= 1.29): it starts before the app, keeps running beside it, and stops after it.
Injection is idempotent: what it adds is identified by name and replaced in place, so running
it twice (or the webhook being reinvoked) changes nothing.

Per-workload annotations (on the pod template, or on the workload itself) tune the result; see
:data:`ANNOTATIONS`. Nothing here does I/O.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from sidecar import __version__

PREFIX = "spiffe-oauth-sidecar.io/"
CONTAINER = "spiffe-oauth-sidecar"
IMAGE = f"ghcr.io/spiffe-oauth-sidecar/sidecar:{__version__}"
CONFIG_MAP = "spiffe-oauth-sidecar"

SPIFFE_VOLUME = "spiffe-workload-api"
SPIFFE_DIR = "/spiffe-workload-api"
SPIFFE_SOCKET = f"unix://{SPIFFE_DIR}/spire-agent.sock"
CONFIG_VOLUME = "spiffe-oauth-sidecar-config"
CONFIG_DIR = "/etc/sidecar"
TMP_VOLUME = "spiffe-oauth-sidecar-tmp"
# TLS interception (docs/https.md): the CA key stays in a volume only the sidecar mounts; what
# the app must trust is written to a second one the app containers mount read-only.
CA_VOLUME = "spiffe-oauth-sidecar-ca"
CA_DIR = "/var/run/spiffe-oauth-sidecar/ca"
TRUST_VOLUME = "spiffe-oauth-sidecar-trust"
TRUST_DIR = "/var/run/spiffe-oauth-sidecar/trust"
TRUST_BUNDLE = f"{TRUST_DIR}/ca-bundle.pem"  # the system CAs + the pod CA
TRUST_CA = f"{TRUST_DIR}/ca.pem"
TRUST_STORE = f"{TRUST_DIR}/truststore.p12"
JAVA_TRUST = f"-Djavax.net.ssl.trustStore={TRUST_STORE} -Djavax.net.ssl.trustStoreType=PKCS12"
RUN_AS = 65532  # the image's numeric non-root user
RUN_AS = 65532  # the image's numeric non-root user (the UID the capture rules exclude)
RULES_CONTAINER = "spiffe-oauth-sidecar-iptables"  # transparent capture's init container
XTABLES_VOLUME = "spiffe-oauth-sidecar-xtables"  # /run for iptables' lock file

# Names the app must reach directly, never through the proxy: loopback and in-cluster services.
NO_PROXY = "localhost,127.0.0.1,::1,.svc,.svc.cluster.local,.cluster.local,kubernetes.default"

ANNOTATIONS = {
    "inject": '"false" to leave this workload alone',
    "intercept": '"true": the app calls https:// too (HTTPS_PROXY, the pod CA and the trust '
    "variables; routes need intercept: true)",
    "config-map": f"ConfigMap holding sidecar.yaml (default {CONFIG_MAP})",
    "port": "proxy port on 127.0.0.1 the app's HTTP_PROXY points at (default 15001)",
    "admin-port": "port of /healthz, /readyz and /metrics on the pod IP (default 15000)",
    "image": "sidecar image (default the release matching this injector)",
    "cpu-request": "CPU request (default 50m)",
    "memory-request": "memory request (default 64Mi)",
    "memory-limit": "memory limit (default 128Mi)",
    "transparent": '"true" to capture the pod\'s outbound TCP with iptables (an init container '
    "with NET_ADMIN and NET_RAW), for apps that ignore HTTP_PROXY",
    "transparent-port": "port of the transparent listener on 127.0.0.1 (default 15006)",
    "transparent-exclude-uids": "comma-separated UIDs whose traffic is never captured "
    "(Istio: 1337)",
    "transparent-exclude-cidrs": "comma-separated destination networks never captured",
}

# Kind -> path to the pod template's (metadata, spec) parent; "" is the object itself (Pod).
POD_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")


class InjectError(ValueError):
    """The input cannot be injected safely; the message says where and why."""


@dataclass(frozen=True)
class Options:
    enabled: bool = True
    intercept: bool = False  # opt-in: the app is given the pod CA and HTTPS_PROXY
    config_map: str = CONFIG_MAP
    port: int = 15001
    admin_port: int = 15000
    image: str = IMAGE
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    memory_limit: str = "128Mi"
    transparent: bool = False
    transparent_port: int = 15006
    transparent_exclude_uids: tuple[int, ...] = ()
    transparent_exclude_cidrs: tuple[str, ...] = ()

    def with_annotations(self, annotations: Mapping[str, Any]) -> Options:
        """These options, overridden by the ``spiffe-oauth-sidecar.io/*`` annotations."""
        ours = {k[len(PREFIX) :]: v for k, v in annotations.items() if k.startswith(PREFIX)}
        unknown = sorted(set(ours) - set(ANNOTATIONS))
        if unknown:
            raise InjectError(
                f"unknown annotation {PREFIX}{unknown[0]} (known: "
                + ", ".join(PREFIX + k for k in ANNOTATIONS)
                + ")"
            )
        changes: dict[str, Any] = {}
        for key, raw in ours.items():
            value = str(raw).strip()
            where = f"annotation {PREFIX}{key}={value!r}"
            if key in ("inject", "intercept", "transparent"):
                if value.lower() not in ("true", "false", "enabled", "disabled"):
                    raise InjectError(f"{where}: must be true or false")
                changes["enabled" if key == "inject" else key] = value.lower() in (
                    "true",
                    "enabled",
                )
            elif key.startswith("transparent-exclude-"):
                changes[key.replace("-", "_")] = _exclusions(key, value, where)
            elif key == "config-map":
                if not _DNS_LABEL.match(value):
                    raise InjectError(f"{where}: must be a ConfigMap name (DNS label)")
                changes["config_map"] = value
            elif key in ("port", "admin-port", "transparent-port"):
                if not value.isdigit() or not 1 <= int(value) <= 65535:
                    raise InjectError(f"{where}: must be a port number 1-65535")
                changes[key.replace("-", "_")] = int(value)
            elif key == "image":
                if not _IMAGE.match(value):
                    raise InjectError(f"{where}: must be an image reference")
                changes["image"] = value
            else:
                if not _QUANTITY.match(value):
                    raise InjectError(
                        f"{where}: must be a Kubernetes quantity such as 100m or 64Mi"
                    )
                changes[key.replace("-", "_")] = value
        options = replace(self, **changes)
        if options.port == options.admin_port:
            raise InjectError("the proxy port and the admin port must differ")
        if options.transparent and options.transparent_port in (options.port, options.admin_port):
            raise InjectError("the transparent port must differ from the proxy and admin ports")
        return options


def _exclusions(key: str, value: str, where: str) -> tuple[Any, ...]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if key.endswith("uids"):
        if not all(v.isdigit() for v in items):
            raise InjectError(f"{where}: must be comma-separated numeric UIDs")
        return tuple(int(v) for v in items)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise InjectError(f"{where}: {item!r} is not an IP network") from None
    return tuple(items)


DEFAULTS = Options()


# -- documents -----------------------------------------------------------------------------------


def inject_documents(documents: Iterable[Any], options: Options = DEFAULTS) -> list[Any]:
    """Inject every workload in a multi-document stream; other documents pass through as-is."""
    out = []
    for index, doc in enumerate(documents, 1):
        if doc is None:  # an empty document (a stray ``---``)
            continue
        try:
            out.append(inject_object(doc, options))
        except InjectError as exc:
            raise InjectError(f"document {index}{_describe(doc)}: {exc}") from None
    return out


def inject_object(obj: Any, options: Options = DEFAULTS) -> Any:
    """A copy of one Kubernetes object with the sidecar added (if it holds a pod template)."""
    if not isinstance(obj, dict):
        raise InjectError("is not a Kubernetes object (expected a mapping)")
    kind = obj.get("kind")
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List") and "items" in obj):
        items = obj.get("items")
        if not isinstance(items, list):
            raise InjectError("a List needs an items sequence")
        result = copy.deepcopy(obj)
        result["items"] = [inject_object(item, options) for item in items]
        return result
    if kind not in POD_PATHS:
        return obj  # Services, ConfigMaps, CRDs ...: untouched
    result = copy.deepcopy(obj)
    template: Any = result
    for step in POD_PATHS[kind]:
        template = template.get(step) if isinstance(template, dict) else None
        if not isinstance(template, dict):
            raise InjectError(f"{'.'.join(POD_PATHS[kind])} is missing or not a mapping")
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        path = ".".join((*POD_PATHS[kind], "spec"))
        raise InjectError(f"{path} is missing or not a mapping")
    annotations = {
        **_annotations(result),
        **(_annotations(template) if template is not result else {}),
    }
    chosen = options.with_annotations(annotations)
    if chosen.enabled:
        inject_pod_spec(template["spec"], chosen)
    return result


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = obj.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise InjectError("metadata.annotations must be a mapping")
    return annotations


def _describe(doc: Any) -> str:
    if not isinstance(doc, dict):
        return ""
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    name = metadata.get("name") or metadata.get("generateName") or "?"
    return f" ({doc.get('kind', '?')} {name})"


# -- the pod spec ----------------------------------------------------------------------------------


def inject_pod_spec(spec: dict[str, Any], options: Options) -> None:
    """Add (or bring up to date) the sidecar, its volumes and the app's proxy variables."""
    if spec.get("hostNetwork"):
        raise InjectError(
            "hostNetwork pods share the node's loopback: the proxy port would be reachable by "
            "every hostNetwork pod on the node, so they are not injected"
        )
    containers = _named_list(spec, "containers")
    if not containers:
        raise InjectError("the pod has no containers")
    if any(c.get("name") == CONTAINER for c in containers):
        raise InjectError(
            f"a container named {CONTAINER} is already among the app containers; remove it "
            "(the sidecar runs as a native sidecar init container)"
        )
    init = _named_list(spec, "initContainers")
    _upsert(init, sidecar_container(options), first=True)
    volumes = _named_list(spec, "volumes")
    for volume in sidecar_volumes(options):
        _upsert(volumes, volume)
    # Transparent capture: the rules go in before the sidecar and the app start (init
    # containers run in order); turning it off again removes what it added (new pods only).
    init[:] = [c for c in init if c.get("name") != RULES_CONTAINER]
    volumes[:] = [v for v in volumes if v.get("name") != XTABLES_VOLUME]
    if options.transparent:
        init.insert(0, rules_container(options))
        volumes.append(
            {"name": XTABLES_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
        )
    for container in containers:
        env = _named_list(container, "env")
        for var in proxy_env(options):
            _upsert(env, var)
        if options.intercept:
            for var in trust_env():
                _keep_or_add(env, var)
            _merge_java_options(env)
            mounts = _named_list(container, "volumeMounts")
            _upsert(mounts, {"name": TRUST_VOLUME, "mountPath": TRUST_DIR, "readOnly": True})


def sidecar_container(options: Options) -> dict[str, Any]:
    container = _sidecar_container(options)
    if options.intercept:
        container["env"] += [
            {"name": "SIDECAR_CA_DIR", "value": CA_DIR},
            {"name": "SIDECAR_TRUST_DIR", "value": TRUST_DIR},
        ]
        container["volumeMounts"] += [
            {"name": CA_VOLUME, "mountPath": CA_DIR},
            {"name": TRUST_VOLUME, "mountPath": TRUST_DIR},
        ]
    return container


def _sidecar_container(options: Options) -> dict[str, Any]:
    def probe(path: str, **timing: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "sidecar-admin"}, **timing}

    return {
        "name": CONTAINER,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["run"],
        "restartPolicy": "Always",  # a native sidecar
        "env": [
            {"name": "SPIFFE_ENDPOINT_SOCKET", "value": SPIFFE_SOCKET},
            {"name": "SIDECAR_CONFIG", "value": f"{CONFIG_DIR}/sidecar.yaml"},
            {"name": "SIDECAR_LISTEN", "value": f"127.0.0.1:{options.port}"},
            {"name": "SIDECAR_ADMIN", "value": f"0.0.0.0:{options.admin_port}"},
            *(
                [{"name": "SIDECAR_TRANSPARENT", "value": f"127.0.0.1:{options.transparent_port}"}]
                if options.transparent
                else []
            ),
        ],
        "ports": [
            {"name": "sidecar-proxy", "containerPort": options.port, "protocol": "TCP"},
            {"name": "sidecar-admin", "containerPort": options.admin_port, "protocol": "TCP"},
        ],
        # The kubelet probes the pod IP, and Prometheus scrapes it: the admin port (health and
        # metrics, never a credential) listens on the pod IP; the proxy stays on loopback.
        "startupProbe": probe("/healthz", periodSeconds=1, failureThreshold=60),
        "readinessProbe": probe("/readyz", periodSeconds=5, failureThreshold=2),
        "livenessProbe": probe("/healthz", periodSeconds=10, failureThreshold=3),
        "resources": {
            "requests": {"cpu": options.cpu_request, "memory": options.memory_request},
            "limits": {"memory": options.memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": SPIFFE_VOLUME, "mountPath": SPIFFE_DIR, "readOnly": True},
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
        ],
    }


def rules_container(options: Options) -> dict[str, Any]:
    """The init container that installs the capture rules in the pod's network namespace: the
    sidecar image, as root with NET_ADMIN and NET_RAW only (iptables needs both), no shell."""
    args = ["iptables", "install", "--uid", str(RUN_AS), "--port", str(options.transparent_port)]
    for uid in options.transparent_exclude_uids:
        args += ["--exclude-uid", str(uid)]
    for cidr in options.transparent_exclude_cidrs:
        args += ["--exclude-cidr", cidr]
    return {
        "name": RULES_CONTAINER,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"memory": "64Mi"},
        },
        "securityContext": {
            "runAsNonRoot": False,
            "runAsUser": 0,
            "runAsGroup": 0,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": "/run"}],
    }


def sidecar_volumes(options: Options) -> list[dict[str, Any]]:
    volumes = [
        {"name": SPIFFE_VOLUME, "csi": {"driver": "csi.spiffe.io", "readOnly": True}},
        {"name": CONFIG_VOLUME, "configMap": {"name": options.config_map}},
        {"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    if options.intercept:
        # Both live as long as the pod: a sidecar restart keeps the CA the app loaded.
        volumes += [
            {"name": CA_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            {"name": TRUST_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}},
        ]
    return volumes


def proxy_env(options: Options) -> list[dict[str, Any]]:
    proxy = f"http://127.0.0.1:{options.port}"
    env = [
        {"name": "HTTP_PROXY", "value": proxy},
        {"name": "http_proxy", "value": proxy},
        {"name": "NO_PROXY", "value": NO_PROXY},
        {"name": "no_proxy", "value": NO_PROXY},
    ]
    if options.intercept:
        env += [{"name": "HTTPS_PROXY", "value": proxy}, {"name": "https_proxy", "value": proxy}]
    return env


def trust_env() -> list[dict[str, Any]]:
    """The variables the common runtimes read for their trusted CAs (docs/https.md)."""
    return [
        {"name": "SSL_CERT_FILE", "value": TRUST_BUNDLE},  # OpenSSL: Python ssl, urllib, httpx
        {"name": "REQUESTS_CA_BUNDLE", "value": TRUST_BUNDLE},  # requests (certifi otherwise)
        {"name": "CURL_CA_BUNDLE", "value": TRUST_BUNDLE},
        {"name": "NODE_EXTRA_CA_CERTS", "value": TRUST_CA},  # added to Node's own list
    ]


def _keep_or_add(env: list[dict[str, Any]], var: dict[str, Any]) -> None:
    """An app that names its own CA file keeps it (replacing it would drop the CAs it trusts):
    it must add the pod CA to that file itself (docs/https.md)."""
    if not any(e.get("name") == var["name"] for e in env):
        env.append(var)


def _merge_java_options(env: list[dict[str, Any]]) -> None:
    """JAVA_TOOL_OPTIONS gets the truststore flags added, never an existing value replaced;
    an app that already chose a truststore keeps it."""
    for entry in env:
        if entry.get("name") == "JAVA_TOOL_OPTIONS":
            value = entry.get("value")
            if isinstance(value, str) and "-Djavax.net.ssl.trustStore=" not in value:
                entry["value"] = f"{value} {JAVA_TRUST}".strip()
            return  # a valueFrom, or a truststore already chosen: left alone
    env.append({"name": "JAVA_TOOL_OPTIONS", "value": JAVA_TRUST})


def _named_list(parent: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = parent.get(key)
    if items is None:
        items = parent[key] = []
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("name"), str) for i in items
    ):
        raise InjectError(f"{key} must be a list of named entries")
    return items


def _upsert(items: list[dict[str, Any]], item: dict[str, Any], *, first: bool = False) -> None:
    for index, existing in enumerate(items):
        if existing.get("name") == item["name"]:
            items[index] = item
            return
    if first:
        items.insert(0, item)
    else:
        items.append(item)
