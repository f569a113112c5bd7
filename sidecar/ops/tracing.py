"""OpenTelemetry traces of the data path, optional: ``pip install 'spiffe-oauth-sidecar[otel]'``.

Off unless ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (and
``OTEL_SDK_DISABLED`` is not ``true``, ``OTEL_TRACES_EXPORTER`` not ``none``). Off, this module
imports nothing of OpenTelemetry and the data path does no work for it: the forwarder's
``forward`` is the untraced method itself. On, spans go over OTLP/HTTP (protobuf) from the SDK's
batch processor thread, configured by the standard ``OTEL_*`` variables (sampler, headers,
timeouts, service name).

Spans:

- ``<METHOD> <route>`` (CLIENT), one per forwarded request: the app's W3C ``traceparent`` is
  its parent when valid (else a new trace starts), and the upstream receives this span as its
  parent (``traceparent`` replaced, ``tracestate`` carried on). Attributes: the route, method,
  upstream host, port and URL without the query, whether it was intercepted, status, retry
  reason, error code.
- ``token wait`` (INTERNAL), its child, when the request waited for a token fetch.
- ``token request <server>`` (CLIENT), one per token request to an authorization server: the
  child of the wait that started it, else (a refresh ahead, a prefetch) a trace of its own.
  Attributes: server, grant, client auth, outcome, whether the AS's DPoP nonce was retried.

Attributes are built from the config and from fixed vocabularies only, never from a header
value: no token, proof, key or SVID can reach a span.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeVar

from sidecar import __version__
from sidecar.errors import ProxyError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from sidecar.config import AuthorizationServer
    from sidecar.ops.audit import Exchange
    from sidecar.proxy.listener import Reply, Request

T = TypeVar("T")

ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
SERVICE = "spiffe-oauth-sidecar"
# W3C Trace Context §3.2 / §3.3: the headers this span replaces in the request sent upstream.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
# What HTTP semantic conventions call the known methods; anything else is _OTHER.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)

# The span of the request being forwarded (each request runs in its own task).
_request: contextvars.ContextVar[Span | None] = contextvars.ContextVar("request", default=None)
# The wait span of the request now awaiting a token fetch (the fetch task inherits it).
_waiting: contextvars.ContextVar[Span | None] = contextvars.ContextVar("waiting", default=None)
# The token request span of the fetch now running.
_fetching: contextvars.ContextVar[Span | None] = contextvars.ContextVar("fetching", default=None)


class TracingError(Exception):
    """Tracing is asked for but cannot run as asked; the message says what to change."""


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces (a pure look at the environment)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINTS)


def traces_endpoint(env: Mapping[str, str]) -> str:
    """OTLP exporter spec: the signal's own endpoint as given, else the base + /v1/traces."""
    explicit = env.get(ENDPOINTS[0], "").strip()
    if explicit:
        return explicit
    return env.get(ENDPOINTS[1], "").strip().rstrip("/") + "/v1/traces"


def from_env(env: Mapping[str, str]) -> Tracing | None:
    """A :class:`Tracing` exporting where ``env`` says, or ``None`` when traces are off."""
    if not wanted(env):
        return None
    chosen = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if chosen != "otlp":
        raise TracingError(f"OTEL_TRACES_EXPORTER={chosen!r}: only otlp (or none) is supported")
    for name in PROTOCOLS:
        protocol = env.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            # (grpc would need grpcio's exporter; the sidecar ships the HTTP one)
            raise TracingError(f"{name}={protocol!r}: only http/protobuf is supported")
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingError(
            f"{next(n for n in ENDPOINTS if env.get(n))} is set but OpenTelemetry is not "
            "installed: pip install 'spiffe-oauth-sidecar[otel]' (or unset it)"
        ) from exc
    # OTEL_SERVICE_NAME wins (as in the SDK); ours only when the operator named none.
    attributes = {"service.version": __version__}
    service = env.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        attributes["service.name"] = service
    elif "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = SERVICE
    provider = TracerProvider(resource=Resource.create(attributes))
    # The exporter reads headers, timeout, compression and TLS files from OTEL_* itself.
    exporter = OTLPSpanExporter(endpoint=traces_endpoint(env))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)


class Tracing:
    """Makes the sidecar's spans. Only built when traces are on (see :func:`from_env`)."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer("spiffe-oauth-sidecar", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._kind = SpanKind
        self._error = StatusCode.ERROR
        self._in_context = set_span_in_context

    # -- forwarded requests ------------------------------------------------------------------

    @contextlib.contextmanager
    def forwarding(
        self,
        request: Request,
        reply: Reply,
        exchange: Exchange,
        *,
        route: str,
        origin: str,
        host: str,
        port: int,
        path: str,
    ) -> Iterator[None]:
        """The request's client span, around its forwarding. The app's headers are given this
        span as the parent the upstream sees (W3C Trace Context §3.2: an intermediary replaces
        ``traceparent``, ``tracestate`` travels on)."""
        carrier: dict[str, str] = {}
        for name, value in request.headers:
            lowered = name.lower()
            if lowered in TRACE_HEADERS:
                # §3.3.1.1: several tracestate headers are one list; §3.2.1: one traceparent.
                carrier[lowered] = f"{carrier[lowered]},{value}" if lowered in carrier else value
        method = request.method
        span = self._tracer.start_span(
            f"{method} {route}",
            context=self._propagator.extract(carrier) if carrier else None,
            kind=self._kind.CLIENT,
            attributes={
                "sidecar.route": route,
                "http.request.method": method if method in KNOWN_METHODS else "_OTHER",
                "server.address": host,
                "server.port": port,
                # RFC 3986 §3.4: the query is left out (apps put secrets there; the audit log
                # leaves it out by default too).
                "url.full": origin + path,
                # decrypted from the app's https:// (an intercepting route, docs/https.md)
                "sidecar.intercepted": exchange.intercepted,
            },
        )
        if carrier:
            request.headers = [(n, v) for n, v in request.headers if n.lower() not in TRACE_HEADERS]
        sent: dict[str, str] = {}
        self._propagator.inject(sent, context=self._in_context(span))
        request.headers.extend(sent.items())
        reset = _request.set(span)
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            _request.reset(reset)
            self._end_request(span, reply.status, exchange.retry, error)

    def _end_request(
        self, span: Span, status: int, retry: str | None, error: BaseException | None
    ) -> None:
        if isinstance(error, ProxyError):
            status = error.status
            span.set_attribute("error.type", error.code)
        elif error is not None:
            span.set_attribute("error.type", type(error).__name__)
        if status:
            span.set_attribute("http.response.status_code", status)
        if retry is not None:
            span.set_attribute("sidecar.retry_reason", retry)
        if error is not None or status >= 400:  # semantic conventions: a client span's 4xx
            span.set_status(self._error)
        span.end()

    async def waited(self, pending: Awaitable[T], route: str) -> T:
        """``await pending`` (a token the request waits for) in a child span of the request;
        a token request started meanwhile is the child of this wait."""
        request = _request.get()
        span = self._tracer.start_span(
            "token wait",
            context=self._in_context(request) if request is not None else None,
            kind=self._kind.INTERNAL,
            attributes={"sidecar.route": route},
        )
        reset = _waiting.set(span)
        try:
            return await pending
        except BaseException as exc:
            span.set_status(self._error)
            span.set_attribute("error.type", exc.code if isinstance(exc, ProxyError) else "error")
            raise
        finally:
            _waiting.reset(reset)
            span.end()

    # -- token requests ----------------------------------------------------------------------

    @contextlib.contextmanager
    def token_request(self, server: AuthorizationServer) -> Iterator[None]:
        waiting = _waiting.get()
        context = self._in_context(waiting) if waiting is not None else None
        span = self._tracer.start_span(
            f"token request {server.name}",
            context=context,
            kind=self._kind.CLIENT,
            attributes={
                "sidecar.authorization_server": server.name,
                "sidecar.authorization_server.kind": server.kind,  # oauth, aws_sts, google_sts
                "oauth.grant_type": server.grant,
                "oauth.client_auth": server.client_auth,
                "oauth.dpop.nonce_retry": False,
            },
        )
        reset = _fetching.set(span)
        try:
            yield
        except BaseException as exc:
            span.set_status(self._error)
            span.set_attribute("error.type", exc.code if isinstance(exc, ProxyError) else "error")
            raise
        finally:
            _fetching.reset(reset)
            span.end()

    def observing(self, observe: Callable[[str, str], None]) -> Callable[[str, str], None]:
        """Wrap the token client's outcome counter: the token request span records the
        outcome and a nonce retry as they are counted."""

        def observed(server: str, outcome: str) -> None:
            span = _fetching.get()
            if span is not None:
                if outcome == "nonce_retry":
                    span.set_attribute("oauth.dpop.nonce_retry", True)
                else:
                    span.set_attribute("sidecar.token.outcome", outcome)
            observe(server, outcome)

        return observed

    # -- lifetime ----------------------------------------------------------------------------

    def flush(self, timeout_seconds: float = 10.0) -> bool:
        """Export what has ended (blocks: call it off the event loop)."""
        return bool(self._provider.force_flush(int(timeout_seconds * 1000)))

    async def close(self) -> None:
        """Export what is left and stop the exporter's thread (off the loop: it blocks)."""
        await asyncio.to_thread(self._provider.shutdown)
        # The SDK's at-fork hook restarts even a shut-down batch processor's thread in a forked
        # child while the processor lives (it holds it weakly): let the processor go, so a
        # process forked later (uvloop runs the hooks before exec) starts no thread of ours.
        del self._provider, self._tracer
