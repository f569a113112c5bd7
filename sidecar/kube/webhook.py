"""Mutating admission webhook: AdmissionReview v1 in, JSONPatch out.

It applies exactly the mutation ``sidecar inject`` does (:mod:`sidecar.kube.inject`) to the Pod
under review and answers with the RFC 6902 patch from the submitted Pod to the injected one.
:func:`review` is pure; :class:`WebhookServer` is the HTTPS edge around it.

A Pod that cannot be injected safely (``hostNetwork``, a bad annotation) is denied with the
reason: in a namespace that opted in, a pod without the sidecar would have no credentials and
would fail later, less clearly. Pods that opted out by annotation are admitted unchanged.

Bounded work per review: bodies above :data:`MAX_REVIEW_BYTES` are a 413; the patch is built by
a structural walk (:func:`json_patch`, linear in the pod, no general-purpose diff); parsing,
injecting and patching run off the event loop, so a huge pod cannot stall the other reviews
(``failurePolicy: Fail`` makes every pod creation in opted-in namespaces wait for us).
Malformed input (not JSON, nesting too deep, ``request.kind`` not a mapping) is a 400.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.kube.inject import DEFAULTS, InjectError, Options, inject_object

log = logging.getLogger("sidecar.webhook")

API_VERSION = "admission.k8s.io/v1"
# etcd's object limit is 1.5 MiB and the API server's request limit 3 MiB; a review wraps one
# object (oldObject is null on CREATE).
MAX_REVIEW_BYTES = 3 * 1024 * 1024


class BadReview(ValueError):
    """The request body is not an AdmissionReview v1 request."""


def review(document: Any, options: Options = DEFAULTS) -> dict[str, Any]:
    """The AdmissionReview response for one AdmissionReview request."""
    request = _request(document)
    uid = request["uid"]
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    kind = request.get("kind") or {}
    if not isinstance(kind, dict):
        raise BadReview("request.kind must be a GroupVersionKind object")
    if kind.get("kind") != "Pod" or kind.get("group", "") != "":
        response["warnings"] = ["spiffe-oauth-sidecar only mutates Pods; object admitted as is"]
    elif request.get("operation", "CREATE") == "CREATE":
        pod = request.get("object")
        try:
            injected = inject_object(pod, options)
        except InjectError as exc:
            response["allowed"] = False
            response["status"] = {
                "code": 400,
                "reason": "BadRequest",
                "message": f"spiffe-oauth-sidecar cannot inject this pod: {exc}",
            }
        else:
            patch = json_patch(pod, injected)
            if patch:
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def json_patch(before: Any, after: Any) -> list[dict[str, Any]]:
    """An RFC 6902 patch from ``before`` to ``after``, by a structural walk: subtrees that are
    equal (compared in C) are skipped, mappings are walked key by key, lists of the same length
    index by index; anything else is replaced whole. Linear in the document per level of depth,
    unlike a general diff; the injection's changes (one init container, volumes, env entries)
    stay small ops."""
    ops: list[dict[str, Any]] = []
    _walk(before, after, "", ops)
    return ops


def _walk(before: Any, after: Any, path: str, ops: list[dict[str, Any]]) -> None:
    if before == after and type(before) is type(after):
        return
    if isinstance(before, dict) and isinstance(after, dict):
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": f"{path}/{_pointer(key)}"})
        for key, value in after.items():
            where = f"{path}/{_pointer(key)}"
            if key in before:
                _walk(before[key], value, where, ops)
            else:
                ops.append({"op": "add", "path": where, "value": value})
    elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for index, (old, new) in enumerate(zip(before, after, strict=True)):
            _walk(old, new, f"{path}/{index}", ops)
    else:
        ops.append({"op": "replace", "path": path, "value": after})


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")  # RFC 6901 §3


def _answer(body: bytes, options: Options) -> tuple[dict[str, Any], str | None]:
    """Parse and review one body (run off the event loop): the answer, the namespace."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise BadReview("the body is not valid JSON") from exc
    answer = review(document, options)
    namespace = document["request"].get("namespace")  # review() validated the shape
    return answer, namespace if isinstance(namespace, str) else None


def _request(document: Any) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise BadReview("the body must be a JSON object")
    if document.get("apiVersion") != API_VERSION or document.get("kind") != "AdmissionReview":
        raise BadReview(f"expected kind AdmissionReview, apiVersion {API_VERSION}")
    request = document.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise BadReview("request.uid is missing")
    return request


class ReloadingCertificate:
    """A server TLS context whose certificate is re-read when its files change (cert-manager)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._version = self._stat()
        self.context.load_cert_chain(cert, key)

    def _stat(self) -> bytes:
        # The content, not mtimes: a Secret volume swaps a symlink, a test rewrites in place,
        # and two writes can share a coarse timestamp. Two small files, read once a minute.
        return hashlib.sha256(self.cert.read_bytes() + b"\0" + self.key.read_bytes()).digest()

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed; new handshakes use them. True: reloaded."""
        try:
            version = self._stat()
            if version == self._version:
                return False
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            # Mid-rotation (one file new, one old) or a broken pair: keep serving the old one.
            log.warning("webhook certificate not reloaded", extra={"error": str(exc)})
            return False
        self._version = version
        log.info("webhook certificate reloaded")
        return True


class WebhookServer:
    """``POST /mutate`` (AdmissionReview) and ``GET /healthz`` over HTTPS."""

    def __init__(
        self,
        certificate: ReloadingCertificate,
        *,
        host: str = "0.0.0.0",  # noqa: S104 - the API server calls in over the pod IP
        port: int = 8443,
        options: Options = DEFAULTS,
        reload_interval: float = 60.0,
    ) -> None:
        self.certificate = certificate
        self.options = options
        self._host, self._port = host, port
        self._reload_interval = reload_interval
        self._runner: web.AppRunner | None = None
        self._reloader: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_REVIEW_BYTES)
        app.router.add_post("/mutate", self._mutate)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        context = self.certificate.context
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._reloader = asyncio.create_task(self._reload_loop())
        log.info("webhook listening", extra={"port": self.port})

    async def stop(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reload_interval)
            await asyncio.to_thread(self.certificate.reload_if_changed)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _mutate(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            detail = f"the review is larger than {MAX_REVIEW_BYTES} bytes"
            return web.json_response({"error": "too_large", "detail": detail}, status=413)
        try:
            answer, namespace = await asyncio.to_thread(_answer, body, self.options)
        except BadReview as exc:
            return web.json_response({"error": "bad_request", "detail": str(exc)}, status=400)
        except RecursionError:
            detail = "the review is nested too deeply"
            return web.json_response({"error": "bad_request", "detail": detail}, status=400)
        response = answer["response"]
        log.info(
            "admission review",
            extra={
                "uid": response["uid"],
                "allowed": response["allowed"],
                "patched": "patch" in response,
                "namespace": namespace,
            },
        )
        return web.json_response(answer)
