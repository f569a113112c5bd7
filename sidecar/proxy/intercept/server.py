"""The server side of intercepted TLS: a leaf per host, the handshake on an app's connection.

:func:`accept_tls` is the one reusable step: "wrap this transport in TLS for host X" (after
``CONNECT X:443`` -> ``200``, or for a connection captured transparently). It runs
``loop.start_tls(..., server_side=True)`` on the same transport. The handshake starts on an
SNI gate (a pooled context, one per handshake in flight) whose callback switches to the host's
leaf context when the SNI names the CONNECT host and otherwise refuses with a fatal
``unrecognized_name`` alert; TLS 1.2 at least, ALPN ``http/1.1`` only. A failure raises
:class:`HandshakeFailed` with a reason from a fixed vocabulary (a metric label) and a sentence
for the operator.

:class:`ServerContexts` keeps one context per host (bounded), minted off the event loop and
replaced before the leaf's expiry.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

from sidecar.proxy.intercept.ca import Leaf, PodCA

log = logging.getLogger("sidecar.intercept")

HANDSHAKE_TIMEOUT = 10.0  # seconds for the app's TLS handshake
MAX_HOSTS = 256  # leaf contexts kept (wildcard routes: bounded)
MAX_IDLE_GATES = 64  # SNI gates kept for reuse

# Handshake failure reasons (the label of sidecar_intercept_handshakes_total).
REASONS = ("unknown_ca", "sni_mismatch", "protocol", "closed", "timeout")

# Which variable each runtime reads for its trust store: the log line tells the operator.
TRUST_HINT = (
    "the app does not trust the sidecar's pod CA: point the runtime at the exported bundle "
    "(SSL_CERT_FILE for OpenSSL/Python ssl/urllib/httpx, REQUESTS_CA_BUNDLE for requests, "
    "CURL_CA_BUNDLE or --cacert for curl, NODE_EXTRA_CA_CERTS for Node, "
    "JAVA_TOOL_OPTIONS=-Djavax.net.ssl.trustStore=<truststore.p12> for the JVM); "
    "`sidecar inject` sets them all, `sidecar ca` prints the CA"
)


class HandshakeFailed(Exception):
    """The app's TLS handshake failed; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_UNTRUSTED = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "UNSUPPORTED_CERTIFICATE")


def classify(exc: BaseException, sni_refused: bool) -> HandshakeFailed:
    """One vocabulary for what OpenSSL, the loop and the peer report."""
    if sni_refused:
        return HandshakeFailed("sni_mismatch", "the TLS SNI named another host than CONNECT")
    if isinstance(exc, TimeoutError):
        return HandshakeFailed("timeout", "the app did not finish its TLS handshake in time")
    if isinstance(exc, ssl.SSLError):
        text = f"{exc.reason or ''} {exc}".upper()
        if any(mark in text for mark in _UNTRUSTED):
            return HandshakeFailed("unknown_ca", TRUST_HINT)
        return HandshakeFailed("protocol", f"TLS handshake failed ({exc.reason or 'ssl error'})")
    # A client that rejects the certificate often just hangs up (no alert): say so too.
    return HandshakeFailed(
        "closed",
        "the app closed the connection during the TLS handshake (often: it does not trust the "
        "pod CA; " + TRUST_HINT.split(": ", 1)[1] + ")",
    )


def _normal(name: str) -> str:
    return name.lower().rstrip(".")


class _HostContext:
    """A server context holding one host's leaf (shared by that host's connections)."""

    def __init__(self, host: str, leaf: Leaf) -> None:
        self.host = host
        self.leaf = leaf
        self.context = _server_context()
        _load_chain(self.context, leaf)


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    # The SNI gate's context stays the SSL object's session context: a renegotiation would
    # call its callback again after the gate went back to the pool.
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


# RFC 8446 §6 / RFC 5246 §7.2: a plaintext alert record, fatal (2), unrecognized_name (112).
_UNRECOGNIZED_NAME_ALERT = b"\x15\x03\x03\x00\x02\x02\x70"


class _SniGate:
    """The context a handshake starts with: its SNI callback switches to the host's context
    when the SNI names the CONNECT host, else refuses. One gate per handshake in flight (a
    pool: making an SSLContext costs ~0.4 ms), so a refusal is known per connection."""

    def __init__(self) -> None:
        self.context = _server_context()
        self.context.sni_callback = self._check
        self.host: _HostContext | None = None
        self.transport: asyncio.Transport | None = None
        self.refused = False

    def arm(self, host: _HostContext, transport: asyncio.Transport) -> None:
        self.host, self.transport, self.refused = host, transport, False

    def disarm(self) -> None:
        self.host = self.transport = None

    def _check(
        self, sslobj: ssl.SSLObject, servername: str | None, context: ssl.SSLContext
    ) -> int | None:
        host = self.host
        if host is None:  # not armed (cannot happen: renegotiation is off)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        if servername is not None and _normal(servername) == host.host:
            sslobj.context = host.context  # the leaf for this host
            return None
        self.refused = True
        log.warning(
            "TLS refused: the SNI does not name the CONNECT host",
            extra={
                "event": "intercept_refused",
                "host": host.host,
                "sni": (servername or "(none)")[:253],
            },
        )
        # OpenSSL queues the same alert, but the loop's TLS layer closes a failed handshake
        # without flushing it: write it to the connection ourselves (nothing was sent yet).
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(_UNRECOGNIZED_NAME_ALERT)
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME


def _load_chain(context: ssl.SSLContext, leaf: Leaf) -> None:
    """ssl loads keys only from files: a memfd keeps the leaf key off every disk."""
    data = leaf.chain_pem + leaf.key_pem
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("sidecar-leaf", 0)
        try:
            os.write(fd, data)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory() as tmp:  # pragma: no cover - not Linux
        path = Path(tmp) / "leaf.pem"
        path.touch(0o600)
        path.write_bytes(data)
        context.load_cert_chain(str(path))


class ServerContexts:
    """One server context per intercepted host, minted off the loop and cached (bounded);
    a leaf past its ``renew_at`` is replaced by a new one on the next connection."""

    def __init__(
        self,
        ca: PodCA,
        leaf_hours: float,
        *,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
        max_hosts: int = MAX_HOSTS,
    ) -> None:
        self.ca = ca
        self.leaf_hours = leaf_hours
        self._now = now
        self._max = max_hosts
        self._hosts: collections.OrderedDict[str, _HostContext] = collections.OrderedDict()
        self._minting: dict[str, asyncio.Future[_HostContext]] = {}
        self._gates: list[_SniGate] = []  # idle ones
        self.minted = 0

    def gate(self) -> _SniGate:
        return self._gates.pop() if self._gates else _SniGate()

    def release(self, gate: _SniGate) -> None:
        gate.disarm()
        if len(self._gates) < MAX_IDLE_GATES:
            self._gates.append(gate)

    def __len__(self) -> int:
        return len(self._hosts)

    async def get(self, host: str) -> _HostContext:
        found = self._hosts.get(host)
        if found is not None and self._now() < found.leaf.renew_at:
            self._hosts.move_to_end(host)
            return found
        pending = self._minting.get(host)
        if pending is None:  # one mint per host at a time, whoever asks
            pending = asyncio.ensure_future(asyncio.to_thread(self._mint, host))
            self._minting[host] = pending
            pending.add_done_callback(lambda _: self._minting.pop(host, None))
        made = await asyncio.shield(pending)
        self._hosts[host] = made
        self._hosts.move_to_end(host)
        while len(self._hosts) > self._max:
            self._hosts.popitem(last=False)
        return made

    def _mint(self, host: str) -> _HostContext:
        leaf = self.ca.issue(host, self.leaf_hours, now=self._now())
        self.minted += 1
        return _HostContext(host, leaf)


async def accept_tls(
    transport: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    host: str,
    contexts: ServerContexts,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> asyncio.Transport:
    """Complete a server-side TLS handshake for ``host`` on ``transport`` (whose reading the
    caller has paused); return the TLS transport ``protocol`` now uses. Raises
    :class:`HandshakeFailed` (the connection is then closed).

    With uvloop, reading cannot be paused from ``connection_made`` (the loop starts reading
    right after it): a caller wrapping a connection as soon as it is accepted pauses from a
    ``call_soon`` callback, or awaits nothing between accepting and calling this."""
    host_context = await contexts.get(_normal(host))
    if transport.is_closing():  # the app left while its leaf was minted
        raise classify(EOFError(), False)
    loop = asyncio.get_running_loop()
    gate = contexts.gate()
    gate.arm(host_context, transport)  # type: ignore[arg-type]  # uvloop's are not subclasses
    try:
        tls = await loop.start_tls(
            transport,  # type: ignore[arg-type]
            protocol,
            gate.context,
            server_side=True,
            ssl_handshake_timeout=timeout,
        )
    except (ssl.SSLError, OSError, TimeoutError, ConnectionError, EOFError) as exc:
        transport.close()
        raise classify(exc, gate.refused) from None
    finally:
        contexts.release(gate)
    if tls is None:  # the peer closed the connection during the handshake
        transport.close()
        raise classify(EOFError(), False)
    return tls
