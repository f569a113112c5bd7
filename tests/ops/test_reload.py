"""Hot reload: a ConfigMap-style symlink swap under load loses no request; bad files are refused."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import ssl
from pathlib import Path
from typing import Any

import yaml

from sidecar import config
from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.ops import logs as logs_module
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, LogCapture

URL = f"http://{SAAS_HOST}/v1/invoices"


class ConfigMapVolume:
    """What the kubelet does: files in a timestamped dir, ``..data`` swapped atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(exist_ok=True)

    def publish(self, doc: Any) -> Path:
        self.version += 1
        version_dir = self.root / f"..2026_11_23_{self.version}"
        version_dir.mkdir()
        file = version_dir / "sidecar.yaml"
        if isinstance(doc, bytes):
            file.write_bytes(doc)
        else:
            file.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version_dir.name)
        os.replace(tmp, self.root / "..data")  # atomic rename, as the kubelet does
        link = self.root / "sidecar.yaml"
        if not link.is_symlink():
            link.symlink_to("..data/sidecar.yaml")
        return link


def with_rules(
    stack: DevStack, write_scope: str, interval: float = 0.05, *, watch: bool = True
) -> dict[str, Any]:
    doc = stack.sidecar_config(reload={"interval": interval, "watch": watch})
    doc["destinations"][0]["scopes"]["rules"][0]["scopes"] = [write_scope]
    return doc


async def test_symlink_swap_under_load_loses_no_request(stack: DevStack, tmp_path: Path) -> None:
    volume = ConfigMapVolume(tmp_path / "config")
    path = volume.publish(with_rules(stack, "invoices:write"))
    async with Sidecar(config.load(path), grace=5) as sidecar, AppClient(sidecar) as app:
        stop = asyncio.Event()
        statuses: list[int] = []

        async def load() -> None:
            for _ in range(2000):  # bounded in count; stopped once the reload is seen
                if stop.is_set():
                    return
                statuses.append((await app.request("GET", URL))[0])

        workers = [asyncio.create_task(load()) for _ in range(8)]
        volume.publish(with_rules(stack, "invoices:admin"))
        await asyncio.wait_for(sidecar.wait_for_generation(2), 30)
        stop.set()
        await asyncio.gather(*workers)
        status, _, _ = await app.request("POST", f"{URL}/9", data=b"{}")
    assert statuses
    assert set(statuses) == {200}
    assert sidecar.metrics.reloads.labels("success")._value.get() == 1
    # The new rule is in force: the write request asked for the new scope.
    assert stack.auth_server.token_requests[-1].scope == ("invoices:admin",)
    assert status == 403  # the dev SaaS API wants invoices:write, which is no longer asked for


async def test_an_invalid_reload_keeps_the_last_good_config(
    stack: DevStack, tmp_path: Path, logs: LogCapture
) -> None:
    volume = ConfigMapVolume(tmp_path / "config")
    # Explicit reloads only (SIGHUP's path): a file watcher racing them would count twice.
    path = volume.publish(with_rules(stack, "invoices:write", watch=False))
    async with Sidecar(config.load(path), grace=5) as sidecar, AppClient(sidecar) as app:
        broken = with_rules(stack, "invoices:write", watch=False)
        broken["destinations"][0]["scopes"]["rules"][0]["methods"] = ["GET /"]
        broken["destinations"][0]["authorization_server"] = "nope"
        volume.publish(broken)
        assert await sidecar.reload() is False
        volume.publish("listen: [unclosed")
        assert await sidecar.reload() is False
        assert sidecar.generation == 1
        assert (await app.request("GET", URL))[0] == 200
        assert sidecar.metrics.reloads.labels("failure")._value.get() == 2
    rejected = [
        r.__dict__["problem"]
        for r in logs.records
        if r.getMessage().startswith("config reload rejected")
    ]
    assert any(p.startswith("destinations[0].authorization_server:") for p in rejected)
    assert any(p.startswith("destinations[0].scopes.rules[0].methods") for p in rejected)
    assert any("not valid YAML" in p for p in rejected)


async def test_a_reloaded_resource_gets_its_own_token(stack: DevStack, tmp_path: Path) -> None:
    """A token (and its cache key) is never carried over to a route whose audience changed."""
    volume = ConfigMapVolume(tmp_path / "config")
    path = volume.publish(stack.sidecar_config())
    async with Sidecar(config.load(path), grace=5) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        changed = stack.sidecar_config()
        changed["destinations"][0]["resource"] = "https://api.saas.example/v2"
        volume.publish(changed)
        assert await sidecar.reload() is True
        # The dev API still wants the old audience: it rejects the new token, the sidecar fetches
        # one more (its invalid_token retry); both are for the new resource.
        await app.request("GET", URL)
    first, *after = stack.auth_server.token_requests
    assert first.resources == ("https://api.saas.example",)
    assert after
    assert {r.resources for r in after} == {("https://api.saas.example/v2",)}


def ssl_contexts() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, ssl.SSLContext))


async def test_200_reloads_under_traffic_keep_object_counts_bounded(
    stack: DevStack, tmp_path: Path
) -> None:
    """#16 defect 2: what an old config built (prepared upstreams, token keys, pooled
    connections and their TLS contexts) dies with it; only in-flight requests hold more."""
    volume = ConfigMapVolume(tmp_path / "config")
    path = volume.publish(stack.sidecar_config(reload={"watch": False}))
    async with Sidecar(config.load(path), grace=5) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        baseline = ssl_contexts()
        done = asyncio.Event()
        statuses: list[int] = []

        async def traffic() -> None:
            for _ in range(5000):  # bounded in count; stopped once the reloads are over
                if done.is_set():
                    return
                statuses.append((await app.request("GET", URL))[0])

        workers = [asyncio.create_task(traffic()) for _ in range(4)]
        for _ in range(200):
            assert await sidecar.reload() is True
            await asyncio.sleep(0)  # let the traffic through between reloads
        done.set()
        await asyncio.gather(*workers)
        assert set(statuses) == {200}
        forwarder, pool = sidecar.forwarder, sidecar.forwarder.pool
        # Only the current config's route, plus what requests in flight at the last reload
        # re-prepared (none now: the traffic is over).
        assert forwarder.prepared <= 1 + len(workers)
        assert sidecar.credentials.key_count <= 1 + len(workers)
        assert pool.idle_count <= len(workers)
        assert len(pool) <= len(workers)
        assert len(sidecar.credentials.cache) == 1  # one token key: the route never changed
        # One context per CA file of the config in force, plus those pooled connections of the
        # last generations still hold while they close: not one per reload.
        assert ssl_contexts() <= baseline + 2 * len(workers)
        assert sidecar.generation == 201


async def test_reload_applies_limits_log_format_and_reload_settings(
    stack: DevStack, tmp_path: Path, logs: LogCapture
) -> None:
    """limits.*, log.format and reload.* were silently ignored by a reload; listen is logged
    as restart-only."""
    ours = logging.StreamHandler(io.StringIO())
    ours.set_name(logs_module.HANDLER_NAME)
    ours.setFormatter(logs_module.JsonFormatter())
    logging.getLogger().addHandler(ours)
    volume = ConfigMapVolume(tmp_path / "config")
    try:
        path = volume.publish(stack.sidecar_config(reload={"watch": False}))
        async with Sidecar(config.load(path), grace=5) as sidecar, AppClient(sidecar) as app:
            big = {"X-Big": "b" * 3000}
            assert (await app.request("GET", URL, headers=big))[0] == 200
            changed = stack.sidecar_config(
                listen="127.0.0.1:1",  # restart-only
                log={"format": "console"},
                limits={
                    "max_header_bytes": 2048,
                    "replay_buffer_bytes": 4096,
                    "max_app_connections": 7,
                },
                reload={"watch": True, "interval": 0.05},
            )
            volume.publish(changed)
            assert await sidecar.reload() is True
            assert sidecar.listener.max_header_bytes == 2048
            assert sidecar.forwarder.replay_limit == 4096
            assert sidecar.admission.max_connections == 7
            assert isinstance(ours.formatter, logs_module.ConsoleFormatter)
            status, _, _ = await app.request("GET", URL, headers=big)
            assert status == 400  # the new header limit is in force
            # reload.watch is now on: the next file change is noticed without a SIGHUP.
            changed["destinations"][0]["scopes"]["default"] = ["invoices:other"]
            volume.publish(changed)
            await asyncio.wait_for(sidecar.wait_for_generation(3), 30)
            assert sidecar.proxy_address is not None
            assert sidecar.proxy_address.port != 1  # still on the old port until a restart
    finally:
        logging.getLogger().removeHandler(ours)
    restart_only = [
        r.__dict__.get("setting")
        for r in logs.records
        if r.getMessage() == "this setting changes only on restart"
    ]
    assert restart_only == ["listen"]


class _Seen(logging.Handler):
    """Sets an event when a record with this message is logged (a condition, not a sleep)."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.message):
            self.event.set()


async def test_the_watcher_survives_any_bad_file_and_applies_a_later_good_one(
    stack: DevStack, tmp_path: Path
) -> None:
    volume = ConfigMapVolume(tmp_path / "config")
    path = volume.publish(with_rules(stack, "invoices:write"))
    seen = _Seen("config reload")
    logging.getLogger("sidecar").addHandler(seen)
    try:
        async with Sidecar(config.load(path), grace=5) as sidecar:
            failures = sidecar.metrics.reloads.labels("failure")
            for bad in (b"a: " + b"[" * 5000 + b"]" * 5000, b"listen: \xff\xfe"):
                seen.event.clear()
                volume.publish(bad)
                await asyncio.wait_for(seen.event.wait(), 30)
            assert failures._value.get() == 2
            volume.publish(with_rules(stack, "invoices:admin"))
            await asyncio.wait_for(sidecar.wait_for_generation(2), 30)
    finally:
        logging.getLogger("sidecar").removeHandler(seen)


async def test_a_reload_that_allows_cleartext_warns_again(
    stack: DevStack, tmp_path: Path, logs: LogCapture
) -> None:
    volume = ConfigMapVolume(tmp_path / "config")
    path = volume.publish(stack.sidecar_config(reload={"watch": False}))
    doc = stack.sidecar_config(reload={"watch": False})
    doc["destinations"][0]["upstream"] = "http://127.0.0.1:9"
    doc["destinations"][0]["allow_cleartext_development_only"] = True
    async with Sidecar(config.load(path), grace=5) as sidecar:
        assert not [r for r in logs.records if "cleartext" in r.getMessage()]
        volume.publish(doc)
        assert await sidecar.reload() is True
        assert await sidecar.reload() is True
    warned = [r.__dict__["setting"] for r in logs.records if "cleartext" in r.getMessage()]
    assert warned == ["destinations[0].upstream"] * 2  # at every reload, not once


async def test_a_reload_keeps_tls_contexts_and_pooled_connections_whose_ca_did_not_change(
    stack: DevStack, tmp_path: Path
) -> None:
    """Reload churn under load: every reload built new TLS contexts (a system-CA store is a
    megabyte of native memory) and closed every pooled connection, so each swap re-handshook
    every upstream. A context whose CA file kept its content is carried over; one whose file
    changed is rebuilt, and its old connections go."""
    ca_copy = tmp_path / "ca.pem"
    ca_copy.write_bytes(stack.ca_file.read_bytes())
    doc = stack.sidecar_config(reload={"watch": False})
    for dest in doc["destinations"]:
        dest["ca_file"] = str(ca_copy)
    volume = ConfigMapVolume(tmp_path / "config")
    path = volume.publish(doc)
    async with Sidecar(config.load(path), grace=5) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        before = sidecar.snapshot.tls.contexts() if sidecar.snapshot else []
        pool = sidecar.forwarder.pool
        assert pool.idle_count == 1
        for _ in range(3):
            assert await sidecar.reload() is True
        assert sidecar.snapshot is not None
        assert [id(c) for c in sidecar.snapshot.tls.contexts()] == [id(c) for c in before]
        assert pool.idle_count == 1  # the upstream connection survived the reloads
        assert (await app.request("GET", URL))[0] == 200
        assert len(pool) == 1  # ... and served the next request

        ca_copy.write_bytes(stack.ca_file.read_bytes() + b"\n")  # same CA, new file content
        assert await sidecar.reload() is True
        after = {id(c) for c in sidecar.snapshot.tls.contexts()}
        assert after != {id(c) for c in before}
        assert pool.idle_count == 0  # made with the superseded context: closed
        assert (await app.request("GET", URL))[0] == 200
