"""OpenTelemetry traces (sidecar/ops/tracing.py), received over real OTLP/HTTP on loopback by a
receiver that decodes the protobuf with opentelemetry-proto: a client span per forwarded
request continuing the app's W3C trace, the upstream parented by it, a child for the token
wait and one for the token request the AS saw; no credential in any attribute; off without
an endpoint, with nothing on the data path."""

from __future__ import annotations

import asyncio
import gc
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sidecar import config
from sidecar.cli import main
from sidecar.credentials.dpop import b64url
from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.ops.tracing import TracingError, from_env, traces_endpoint, wanted
from sidecar.proxy.upstream import Forwarder
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, assert_no_secrets
from tests.ops.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.proxy.test_intercept import close, connect_tls, intercepting, read_answers

URL = f"http://{SAAS_HOST}/v1/invoices"
APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_PARENT = "00f067aa0ba902b7"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


@pytest.fixture(autouse=True)
def no_processor_outlives_its_sidecar() -> Iterator[None]:
    """A stopped sidecar lets its span processor go: the SDK's at-fork hook would otherwise
    restart the processor's thread in every process forked later (uvloop runs the hooks before
    exec), and the suite forks real clients after these tests."""
    yield
    from opentelemetry.sdk._shared_internal import BatchProcessor

    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, BatchProcessor)]


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with OtlpReceiver() as running:
        yield running


@asynccontextmanager
async def traced_sidecar(
    stack: DevStack, receiver: OtlpReceiver, env: dict[str, str] | None = None, **overrides: Any
) -> AsyncIterator[Sidecar]:
    cfg = config.parse(stack.sidecar_config(**overrides))
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint, **(env or {})}
    async with Sidecar(cfg, grace=5.0, env=env) as sidecar:
        assert sidecar.tracing is not None
        yield sidecar


async def exported(sidecar: Sidecar) -> None:
    """Every span ended so far has reached the receiver (the export blocks: off the loop)."""
    assert sidecar.tracing is not None
    assert await asyncio.to_thread(sidecar.tracing.flush)


def upstream_parent(stack: DevStack, index: int = -1) -> tuple[str, str]:
    values = [v for k, v in stack.saas.requests[index].headers if k.lower() == "traceparent"]
    assert len(values) == 1, values
    found = TRACEPARENT.fullmatch(values[0])
    assert found, values
    return found.group(1), found.group(2)


def one(spans: list[ReceivedSpan]) -> ReceivedSpan:
    assert len(spans) == 1, spans
    return spans[0]


# -- forwarded requests ----------------------------------------------------------------------------


async def test_a_request_continues_the_apps_trace_and_parents_the_upstream(
    stack: DevStack, receiver: OtlpReceiver
) -> None:
    async with traced_sidecar(stack, receiver) as sidecar, AppClient(sidecar) as app:
        status, _, _ = await app.request(
            "GET",
            f"{URL}/12345?secret=abc",
            headers={"traceparent": f"00-{APP_TRACE}-{APP_PARENT}-01", "tracestate": "app=1"},
        )
        assert status == 200
        await exported(sidecar)
    client = one(receiver.named("GET saas"))
    assert client.kind == "SPAN_KIND_CLIENT"
    assert (client.trace_id, client.parent_span_id) == (APP_TRACE, APP_PARENT)
    assert client.attributes == {
        "sidecar.route": "saas",
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": stack.saas.port,
        "url.full": f"https://127.0.0.1:{stack.saas.port}/v1/invoices/12345",
        "sidecar.intercepted": False,
        "http.response.status_code": 200,
    }
    assert client.status == "STATUS_CODE_UNSET"
    assert client.resource["service.name"] == "spiffe-oauth-sidecar"
    # The upstream's parent is the sidecar's span, in the app's trace; tracestate travels on.
    assert upstream_parent(stack) == (APP_TRACE, client.span_id)
    seen = stack.saas.requests[-1].headers
    assert [v for k, v in seen if k.lower() == "tracestate"] == ["app=1"]
    # The request waited for the first token: a child span, and the token request its child.
    wait = one(receiver.named("token wait"))
    assert (wait.trace_id, wait.parent_span_id) == (APP_TRACE, client.span_id)
    assert wait.attributes == {"sidecar.route": "saas"}
    token = one(receiver.named("token request"))
    assert (token.trace_id, token.parent_span_id) == (APP_TRACE, wait.span_id)
    assert token.name == "token request dev"
    assert token.kind == "SPAN_KIND_CLIENT"
    assert token.attributes == {
        "sidecar.authorization_server": "dev",
        "sidecar.authorization_server.kind": "oauth",
        "oauth.grant_type": "client_credentials",
        "oauth.client_auth": "jwt_svid",
        "oauth.dpop.nonce_retry": False,
        "sidecar.token.outcome": "ok",
    }


async def test_without_a_valid_traceparent_a_new_trace_starts(
    stack: DevStack, receiver: OtlpReceiver
) -> None:
    # W3C Trace Context §3.2.2: an unknown version ff, an all-zero trace id or parent id, wrong
    # lengths, upper-case hex, garbage: the header is ignored and a new trace starts.
    bad = [
        None,
        f"ff-{APP_TRACE}-{APP_PARENT}-01",
        f"00-{'0' * 32}-{APP_PARENT}-01",
        f"00-{APP_TRACE}-{'0' * 16}-01",
        f"00-{APP_TRACE[:-1]}-{APP_PARENT}-01",
        f"00-{APP_TRACE.upper()}-{APP_PARENT}-01",
        "not a traceparent",
    ]
    async with traced_sidecar(stack, receiver) as sidecar, AppClient(sidecar) as app:
        for value in bad:
            headers = {} if value is None else {"traceparent": value}
            assert (await app.request("GET", URL, headers=headers))[0] == 200
        await exported(sidecar)
    clients = receiver.named("GET saas")
    assert len(clients) == len(bad)
    assert len({c.trace_id for c in clients}) == len(bad)  # a trace each
    for index, client in enumerate(clients):
        assert client.parent_span_id == "", bad[index]
        assert client.trace_id != APP_TRACE
        # What the app sent does not reach the upstream: the sidecar's span does.
        assert upstream_parent(stack, index) == (client.trace_id, client.span_id)


async def test_two_traceparent_headers_in_raw_bytes_are_one_header_ignored(
    stack: DevStack, receiver: OtlpReceiver
) -> None:
    async with traced_sidecar(stack, receiver) as sidecar, AppClient(sidecar) as app:
        answer = await app.raw(
            f"GET {URL} HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"
            f"traceparent: 00-{APP_TRACE}-{APP_PARENT}-01\r\n"
            f"traceparent: 00-{'a' * 32}-{'b' * 16}-01\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        assert answer.startswith(b"HTTP/1.1 200 ")
        await exported(sidecar)
    client = one(receiver.named("GET saas"))
    # §3.2.1: one traceparent; two joined are not a valid one, so a new trace starts.
    assert client.parent_span_id == ""
    assert upstream_parent(stack) == (client.trace_id, client.span_id)


async def test_nonce_retries_are_attributes_of_their_spans(
    stack: DevStack, receiver: OtlpReceiver
) -> None:
    stack.auth_server.proofs.require_nonce = True
    stack.saas.proofs.require_nonce = True
    async with traced_sidecar(stack, receiver) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        assert (await app.request("GET", URL))[0] == 200  # a cached token: no wait
        await exported(sidecar)
    first, second = receiver.named("GET saas")
    assert first.attributes["sidecar.retry_reason"] == "use_dpop_nonce"
    assert "sidecar.retry_reason" not in second.attributes
    token = one(receiver.named("token request"))
    assert token.attributes["oauth.dpop.nonce_retry"] is True
    assert one(receiver.named("token wait")).parent_span_id == first.span_id
    # Both attempts of the first request carried the same span as the upstream's parent.
    assert upstream_parent(stack, 0) == upstream_parent(stack, 1) == (first.trace_id, first.span_id)


async def test_a_request_that_fails_is_an_error_span_with_its_code(
    stack: DevStack, receiver: OtlpReceiver
) -> None:
    stack.auth_server.set_down(True)
    async with traced_sidecar(stack, receiver) as sidecar, AppClient(sidecar) as app:
        status, _, body = await app.request("GET", URL)
        assert status == 503
        await sidecar.credentials.cache.settle()
        await exported(sidecar)
    assert json.loads(body)["error"] == "token_unavailable"
    client = one(receiver.named("GET saas"))
    assert client.status == "STATUS_CODE_ERROR"
    assert client.attributes["error.type"] == "token_unavailable"
    assert client.attributes["http.response.status_code"] == 503
    wait = one(receiver.named("token wait"))
    assert wait.status == "STATUS_CODE_ERROR"
    token = one(receiver.named("token request"))
    assert token.status == "STATUS_CODE_ERROR"
    assert token.attributes["sidecar.token.outcome"] == "unavailable"
    assert token.attributes["error.type"] == "token_unavailable"
    assert stack.saas.requests == []


async def test_no_span_attribute_holds_a_credential(
    stack: DevStack, receiver: OtlpReceiver
) -> None:
    stack.saas.proofs.require_nonce = True
    async with traced_sidecar(stack, receiver) as sidecar, AppClient(sidecar) as app:
        for path in ("/v1/invoices", "/v1/invoices/1?x=1"):
            assert (await app.request("GET", f"http://{SAAS_HOST}{path}"))[0] == 200
        assert (await app.request("POST", f"{URL}/2", data=b"{}"))[0] == 200
        await exported(sidecar)
        d = sidecar.dpop_key._key.private_numbers().private_value
    assert len(receiver.spans) >= 6
    text = json.dumps([(s.name, s.attributes, s.resource) for s in receiver.spans])
    secrets = [*stack.secrets(), b64url(d.to_bytes(32, "big"))]
    assert any(len(s) > 16 for s in secrets)
    assert_no_secrets(text, secrets)
    for span in receiver.spans:
        assert "x=1" not in json.dumps(span.attributes)  # no query string


async def test_a_refresh_no_request_waited_for_is_a_trace_of_its_own(
    stack: DevStack, receiver: OtlpReceiver
) -> None:
    async with traced_sidecar(stack, receiver, tokens={"prefetch": True}) as sidecar:
        await stack.auth_server.wait_for_requests(1)
        await sidecar.credentials.cache.settle()
        await exported(sidecar)
    token = one(receiver.named("token request"))
    assert token.parent_span_id == ""
    assert receiver.named("GET") == []


async def test_the_operators_service_name_is_the_resources(
    stack: DevStack, receiver: OtlpReceiver
) -> None:
    env = {"OTEL_SERVICE_NAME": "billing-egress"}
    async with traced_sidecar(stack, receiver, env) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
        await exported(sidecar)
    assert {s.resource["service.name"] for s in receiver.spans} == {"billing-egress"}


async def test_a_request_decrypted_from_intercepted_tls_says_so(
    stack: DevStack, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    overrides = intercepting(stack, tmp_path)
    async with traced_sidecar(stack, receiver, **overrides) as sidecar:
        reader, writer = await connect_tls(sidecar, tmp_path / "trust")
        try:
            writer.write(
                f"GET /v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"
                f"traceparent: 00-{APP_TRACE}-{APP_PARENT}-01\r\n\r\n".encode()
            )
            ((status, _),) = await read_answers(reader, 1)
        finally:
            await close(writer)
        assert status == 200
        await exported(sidecar)
    client = one(receiver.named("GET saas"))
    assert client.attributes["sidecar.intercepted"] is True
    assert (client.trace_id, client.parent_span_id) == (APP_TRACE, APP_PARENT)
    assert upstream_parent(stack) == (APP_TRACE, client.span_id)


# -- off -------------------------------------------------------------------------------------------


async def test_without_an_endpoint_nothing_traces_and_forward_is_the_plain_method(
    stack: DevStack, receiver: OtlpReceiver
) -> None:
    cfg = config.parse(stack.sidecar_config())
    env = {"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_HEADERS": "a=b"}
    async with Sidecar(cfg, grace=5.0, env=env) as sidecar, AppClient(sidecar) as app:
        assert sidecar.tracing is None
        assert "forward" not in vars(sidecar.forwarder)  # the class's method, untouched
        assert sidecar.forwarder.forward.__func__ is Forwarder.forward  # type: ignore[attr-defined]
        assert "fetch" not in vars(sidecar.token_client)
        assert (await app.request("GET", URL))[0] == 200
    assert receiver.exports == 0
    # The app's own traceparent (none here) is not invented by an untraced sidecar.
    assert [k for k, _ in stack.saas.requests[-1].headers if k.lower() == "traceparent"] == []


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_traces_are_on_only_when_an_endpoint_is_set(env: dict[str, str], on: bool) -> None:
    assert wanted(env) is on


def test_the_traces_endpoint_follows_the_exporter_spec() -> None:
    assert traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == (
        "http://c:4318/v1/traces"
    )
    both = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/custom",
    }
    assert traces_endpoint(both) == "http://t:4318/custom"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "only http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "only http/protobuf"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "only otlp"),
    ],
)
def test_tracing_asked_for_in_a_way_it_cannot_run_is_refused(
    extra: dict[str, str], message: str
) -> None:
    with pytest.raises(TracingError, match=message):
        from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", **extra})


def test_sidecar_run_stops_when_told_to_trace_in_a_way_it_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n"
        "spiffe: {socket: unix:///nonexistent/agent.sock}\n"
        "authorization_servers:\n  corp: {issuer: 'https://login.example.com'}\n"
        "destinations:\n"
        "  - {name: api, host: api.example, upstream: 'https://api.example', "
        "authorization_server: corp}\n"
    )
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert main(["run", "--config", str(path)]) == 2
    # `sidecar run` writes its own log lines to stderr (logs.configure).
    assert "only http/protobuf" in capfd.readouterr().err
