"""``credential: header``: static secrets from files (API-key SaaS), behind the credential seam.

The origin is a real TLS server on loopback that records what arrived; the sidecar is a real
one; files are real files (rotated the way a Kubernetes Secret volume is: a new inode).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar import config
from sidecar.credentials.kinds.static_header import header_value
from sidecar.devstack.stack import DevStack
from sidecar.errors import ConfigError
from sidecar.ops.checks import check_config, explain
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, LogCapture, ManualClock, assert_no_secrets

HOST = "api.saas.example"
API_KEY = "sk-live-0123456789abcdefTESTONLY"
ACCOUNT = "acct-42"
ROTATED = "sk-live-rotated-fedcba9876543210TESTONLY"


# -- the value rule, as values -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"abc\r\nX-Evil: 1",  # a second header
        b"abc\nX-Evil: 1",
        b"abc\rdef",
        b"abc\x00def",  # NUL
        b"abc\x7fdef",  # DEL
        b"abc\x1bdef",  # other controls
        b"abc\tdef",  # HTAB: legal in RFC 9110, refused here: keys have none
        "clé".encode(),  # non-ASCII
        b"\xff\xfe",  # not UTF-8 at all
        b"",
        b"  \n",
    ],
)
def test_a_value_a_header_cannot_carry_is_refused(raw: bytes) -> None:
    assert header_value(raw.decode("utf-8", errors="replace")) is None


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"sk-abc123\n", "sk-abc123"),  # a mounted Secret's final newline
        (b"  key  \r\n", "key"),
        (b"two words", "two words"),  # inner spaces are field-content (RFC 9110 5.5)
        (b"!#$%&'*+-.^_`|~=/:;,", "!#$%&'*+-.^_`|~=/:;,"),
    ],
)
def test_visible_ascii_values_are_kept_without_surrounding_whitespace(
    raw: bytes, value: str
) -> None:
    assert header_value(raw.decode()) == value


# -- config ----------------------------------------------------------------------------------


def _doc(destination: dict[str, Any], *, servers: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "spiffe": {"socket": "unix:///tmp/agent.sock"},
        "destinations": [{"host": HOST, **destination}],
    }
    if servers:
        doc["authorization_servers"] = {"dev": {"issuer": "https://as.example"}}
    return doc


def test_a_header_route_needs_no_authorization_server(tmp_path: Path) -> None:
    cfg = config.parse(
        _doc(
            {
                "credential": "header",
                "headers": [
                    {"name": "X-Api-Key", "file": "key"},
                    {"name": "Authorization", "file": "/abs/tok", "prefix": "Bearer "},
                ],
            }
        ),
        source=tmp_path / "sidecar.yaml",
    )
    (dest,) = cfg.destinations
    assert dest.credential == "header"
    assert not dest.has_server
    assert [(h.name, h.file, h.prefix) for h in dest.headers] == [
        ("X-Api-Key", tmp_path / "key", ""),
        ("Authorization", Path("/abs/tok"), "Bearer "),
    ]
    assert dest.default_scopes == ()  # nothing to choose: every path is served


def test_every_header_route_problem_is_reported_with_its_path() -> None:
    doc = _doc(
        {
            "credential": "header",
            "authorization_server": "dev",
            "scopes": {"default": ["a"]},
            "token_type": "bearer",
            "headers": [
                {"name": "X Api Key", "file": "k"},
                {"name": "Host", "file": "k"},
                {"name": "Proxy-Authorization", "file": "k"},
                {"name": "X-Key", "file": "k", "prefix": "Bearer\r\nX-Evil: 1 "},
                {"name": "x-key", "file": "k"},
                {"name": "X-Other"},
                {"name": "X-Third", "file": "k", "value": "inline"},
            ],
        },
        servers=True,
    )
    with pytest.raises(ConfigError) as info:
        config.parse(doc)
    text = str(info.value)
    for expected in (
        "destinations[0].authorization_server: is for OAuth routes",
        "destinations[0].scopes: is for OAuth routes",
        "destinations[0].token_type: is for OAuth routes",
        "destinations[0].headers[0].name: must be an HTTP header name",
        "destinations[0].headers[1].name: Host is set by the proxy itself",
        "destinations[0].headers[2].name: Proxy-Authorization is set by the proxy itself",
        "destinations[0].headers[3].prefix: must be printable ASCII",
        "destinations[0].headers[4].name: x-key is named twice",
        "destinations[0].headers[5].file: is required",
        "destinations[0].headers[6].value: unknown key",
    ):
        assert expected in text, text


def test_header_settings_belong_to_header_routes() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(_doc({"credential": "header"}))
    assert "destinations[0].headers: credential: header needs headers" in str(info.value)
    doc = _doc(
        {"authorization_server": "dev", "headers": [{"name": "X-Key", "file": "k"}]},
        servers=True,
    )
    with pytest.raises(ConfigError) as info:
        config.parse(doc)
    assert "destinations[0].headers: is only used with credential: header" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config.parse(_doc({"credential": "dpop", "token_type": "bearer"}, servers=True))
    assert "destinations[0].token_type: contradicts credential: dpop" in str(info.value)


def test_check_refuses_unreadable_and_unsafe_files_without_echoing_them(tmp_path: Path) -> None:
    good, bad, big = tmp_path / "good", tmp_path / "bad", tmp_path / "big"
    good.write_text(API_KEY + "\n")
    bad.write_bytes(b"sk-secret-part\r\nX-Evil: injected")
    big.write_bytes(b"k" * (64 * 1024 + 1))
    headers = [
        {"name": "X-Good", "file": str(good)},
        {"name": "X-Bad", "file": str(bad)},
        {"name": "X-Missing", "file": str(tmp_path / "missing")},
        {"name": "X-Big", "file": str(big)},
    ]
    cfg = config.parse(_doc({"credential": "header", "headers": headers}))
    problems = check_config(cfg)
    assert len(problems) == 3, problems
    assert problems[0].startswith("destinations[0].headers[1].file: ")
    assert "characters a header cannot carry" in problems[0]
    assert problems[1].startswith("destinations[0].headers[2].file: cannot read")
    assert problems[2].startswith("destinations[0].headers[3].file: ")
    assert "sk-secret-part" not in " ".join(problems)
    assert "injected" not in " ".join(problems)


def test_explain_names_the_headers_and_files_never_the_values(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(API_KEY)
    headers = [{"name": "Authorization", "file": str(key), "prefix": "Bearer "}]
    cfg = config.parse(_doc({"credential": "header", "headers": headers}))
    text, resolved = explain(cfg, "GET", f"http://{HOST}/v1/things")
    assert "credential     header Authorization (from files)" in text
    assert f"Authorization from {key}, prefix 'Bearer '" in text
    assert API_KEY not in text
    assert resolved.route.server is None


# -- through a running sidecar ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def recording_origin(stack: DevStack) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        await request.read()
        seen.append({"path_qs": request.raw_path, "headers": list(request.raw_headers)})
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tls = stack.ca.issue_server("127.0.0.1", "localhost")
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context())
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


def header_config(stack: DevStack, upstream: str, headers: list[Any], **extra: Any) -> Any:
    doc = stack.sidecar_config()
    dest = doc["destinations"][0]
    for key in ("authorization_server", "resource", "scopes"):
        del dest[key]
    dest.update(host=HOST, upstream=upstream, credential="header", headers=headers, **extra)
    del doc["authorization_servers"]  # no OAuth route: none is needed
    return config.parse(doc)


def write_secret(path: Path, value: str) -> None:
    """As the kubelet updates a Secret volume: a new file renamed into place (a new inode)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)


def received(seen: dict[str, Any], name: bytes) -> list[bytes]:
    return [v for k, v in seen["headers"] if k.lower() == name]


async def test_headers_are_set_from_files_and_the_apps_own_are_stripped(
    stack: DevStack, tmp_path: Path, logs: LogCapture
) -> None:
    key, account = tmp_path / "key", tmp_path / "account"
    write_secret(key, API_KEY)
    write_secret(account, ACCOUNT)
    headers = [
        {"name": "Authorization", "file": str(key), "prefix": "Bearer "},
        {"name": "X-Account-Id", "file": str(account)},
    ]
    async with recording_origin(stack) as (upstream, seen):
        cfg = header_config(stack, upstream, headers, allow_private=True)
        async with Sidecar(cfg, grace=1.0) as sidecar, AppClient(sidecar) as app:
            status, _, body = await app.request(
                "GET",
                f"http://{HOST}/v1/things?page=2",
                headers={"authorization": "Bearer app-placeholder", "X-ACCOUNT-ID": "app"},
            )
            assert status == 200, body
            # Hand-written bytes: repeated and oddly spelled copies of the kind's headers.
            raw = await app.raw(
                f"GET http://{HOST}/v2 HTTP/1.1\r\nHost: {HOST}\r\n"
                "Authorization: Basic YXBwOmFwcA==\r\naUtHoRiZaTiOn: Bearer second\r\n"
                "x-account-id: forged\r\nX-Kept: yes\r\nConnection: close\r\n\r\n".encode()
            )
            assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
            metrics = sidecar.metrics.exposition().decode()
            _, problems = sidecar.readiness()
    first, second = seen
    assert first["path_qs"] == "/v1/things?page=2"
    for request in (first, second):
        assert received(request, b"authorization") == [f"Bearer {API_KEY}".encode()]
        assert received(request, b"x-account-id") == [ACCOUNT.encode()]
    assert received(second, b"x-kept") == [b"yes"]
    assert stack.auth_server.token_requests == []
    assert 'sidecar_credentials_total{kind="header",outcome="ok"} 2.0' in metrics
    assert "route saas" not in problems, problems
    audit = [json.loads(line) for line in logs.lines if "credential_loaded" in line]
    assert [(a["route"], a["kind"], a["headers"]) for a in audit] == [
        ("saas", "header", "Authorization,X-Account-Id")
    ]
    requests = [r for r in map(json.loads, logs.lines) if r.get("event") == "request"]
    assert [(r["token_kind"], r["token_headers"]) for r in requests] == [
        ("header", "Authorization,X-Account-Id")
    ] * 2
    assert_no_secrets(logs.text(), [API_KEY, ACCOUNT])


async def test_a_rotated_file_is_used_from_the_next_check_on(
    stack: DevStack, tmp_path: Path, logs: LogCapture
) -> None:
    key = tmp_path / "key"
    write_secret(key, API_KEY)
    clock = ManualClock()
    async with recording_origin(stack) as (upstream, seen):
        cfg = header_config(
            stack, upstream, [{"name": "X-Api-Key", "file": str(key)}], allow_private=True
        )
        async with Sidecar(cfg, grace=1.0, clock=clock) as sidecar, AppClient(sidecar) as app:
            assert (await app.request("GET", f"http://{HOST}/1"))[0] == 200
            write_secret(key, ROTATED)
            assert (await app.request("GET", f"http://{HOST}/2"))[0] == 200  # not rechecked yet
            clock.advance(2.5)
            assert (await app.request("GET", f"http://{HOST}/3"))[0] == 200
            clock.advance(2.5)
            assert (await app.request("GET", f"http://{HOST}/4"))[0] == 200  # unchanged: no read
            metrics = sidecar.metrics.exposition().decode()
    values = [received(s, b"x-api-key") for s in seen]
    assert values == [
        [API_KEY.encode()],
        [API_KEY.encode()],
        [ROTATED.encode()],
        [ROTATED.encode()],
    ]
    assert 'sidecar_credentials_total{kind="header",outcome="ok"} 2.0' in metrics
    assert_no_secrets(logs.text(), [API_KEY, ROTATED])


async def test_a_broken_or_removed_file_fails_closed_without_showing_it(
    stack: DevStack, tmp_path: Path, logs: LogCapture
) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"sk-part-one\r\nX-Injected: sk-part-two")
    clock = ManualClock()
    async with recording_origin(stack) as (upstream, seen):
        cfg = header_config(
            stack, upstream, [{"name": "X-Api-Key", "file": str(key)}], allow_private=True
        )
        async with Sidecar(cfg, grace=1.0, clock=clock) as sidecar, AppClient(sidecar) as app:
            status, _, body = await app.request("GET", f"http://{HOST}/1")
            assert status == 503
            error = json.loads(body)
            assert "characters a header cannot carry" in error["detail"]
            ready, problems = sidecar.readiness()
            assert not ready
            assert "characters a header cannot carry" in problems["route saas"]
            write_secret(key, API_KEY)  # fixed: the next request reads it again
            assert (await app.request("GET", f"http://{HOST}/2"))[0] == 200
            assert sidecar.readiness()[1].get("route saas") is None
            key.unlink()  # removed: not served from memory after the next check
            clock.advance(2.5)
            status, _, body = await app.request("GET", f"http://{HOST}/3")
            assert status == 503
            assert "cannot read the secret file" in json.loads(body)["detail"]
            metrics = sidecar.metrics.exposition().decode()
    assert len(seen) == 1  # only the request with a good value reached the origin
    for text in (body.decode(), logs.text(), metrics):
        assert_no_secrets(text, ["sk-part-one", "sk-part-two", API_KEY])
    assert 'sidecar_credentials_total{kind="header",outcome="rejected"} 1.0' in metrics
    assert 'sidecar_credentials_total{kind="header",outcome="unavailable"} 1.0' in metrics


async def test_app_credentials_refuse_applies_to_the_header_names(
    stack: DevStack, tmp_path: Path
) -> None:
    key = tmp_path / "key"
    write_secret(key, API_KEY)
    async with recording_origin(stack) as (upstream, seen):
        cfg = header_config(
            stack,
            upstream,
            [{"name": "X-Api-Key", "file": str(key)}],
            allow_private=True,
            app_credentials="refuse",
        )
        async with Sidecar(cfg, grace=1.0) as sidecar, AppClient(sidecar) as app:
            status, _, body = await app.request(
                "GET", f"http://{HOST}/1", headers={"x-api-key": "mine"}
            )
            assert status == 400, body
            assert "(x-api-key: the sidecar supplies it)" in json.loads(body)["detail"]
            # Authorization is not this route's to set: it passes through.
            status, _, _ = await app.request(
                "GET", f"http://{HOST}/2", headers={"Authorization": "Basic eDp5"}
            )
            assert status == 200
    assert [received(s, b"authorization") for s in seen] == [[b"Basic eDp5"]]


async def test_reloads_do_not_keep_old_routes_kinds(stack: DevStack, tmp_path: Path) -> None:
    key = tmp_path / "key"
    write_secret(key, API_KEY)
    source = tmp_path / "sidecar.yaml"
    doc = stack.sidecar_config()
    dest = doc["destinations"][0]
    for name in ("authorization_server", "resource", "scopes"):
        del dest[name]
    del doc["authorization_servers"]
    doc["reload"] = {"watch": False}
    async with recording_origin(stack) as (upstream, seen):
        dest.update(
            host=HOST,
            upstream=upstream,
            credential="header",
            allow_private=True,
            headers=[{"name": "X-Api-Key", "file": str(key)}],
        )
        source.write_text(json.dumps(doc))
        async with Sidecar(config.load(source), grace=1.0) as sidecar, AppClient(sidecar) as app:
            for attempt in range(3):
                dest["read_timeout"] = 30 + attempt  # a different config each time
                source.write_text(json.dumps(doc))
                assert await sidecar.reload()
                assert (await app.request("GET", f"http://{HOST}/{attempt}"))[0] == 200
                assert len(sidecar.credentials._per_route) == 1  # the old routes' kinds went
    assert [received(s, b"x-api-key") for s in seen] == [[API_KEY.encode()]] * 3


async def test_a_sidecar_with_only_header_routes_is_ready_without_an_svid(
    stack: DevStack, tmp_path: Path
) -> None:
    """No route needs the SPIFFE identity: readiness must not wait for an SVID it never asks
    for (the pod would stay unready for ever)."""
    key = tmp_path / "key"
    write_secret(key, API_KEY)
    async with recording_origin(stack) as (upstream, _seen):
        cfg = header_config(
            stack, upstream, [{"name": "X-Api-Key", "file": str(key)}], allow_private=True
        )
        async with Sidecar(cfg, grace=1.0) as sidecar, AppClient(sidecar) as app:
            status, _, body = await app.request("GET", f"http://{HOST}/v1/things")
            assert status == 200, body
            ready, problems = sidecar.readiness()
    assert (ready, problems) == (True, {})
