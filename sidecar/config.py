"""Configuration: frozen data, loaded and validated once.

:func:`load` reads YAML, :func:`parse` validates a plain document and returns a :class:`Config`
or raises :class:`~sidecar.errors.ConfigError` listing *every* problem, each with its YAML path
(``destinations[0].scopes.rules[1].methods: ...``). Nothing validates config on the request
path: the runtime swaps whole ``Config`` objects atomically on reload. The schema is documented
in ``config/README.md``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml

from sidecar.errors import ConfigError

ENV_CONFIG = "SIDECAR_CONFIG"
ENV_SPIFFE_SOCKET = "SPIFFE_ENDPOINT_SOCKET"
# Per-pod overrides of the shared ConfigMap's ports (``sidecar inject`` sets them).
ENV_LISTEN = "SIDECAR_LISTEN"
ENV_ADMIN = "SIDECAR_ADMIN"
# Where the pod CA is kept and exported (``sidecar inject`` sets them to its volumes).
ENV_CA_DIR = "SIDECAR_CA_DIR"
ENV_TRUST_DIR = "SIDECAR_TRUST_DIR"
# Set by ``sidecar inject --transparent``: turns the transparent listener on at this address.
ENV_TRANSPARENT = "SIDECAR_TRANSPARENT"

ClientAuth = Literal["jwt_svid", "jwt_bearer", "mtls", "client_secret", "none"]
Grant = Literal["client_credentials", "token_exchange", "jwt_bearer"]
TokenType = Literal["dpop", "bearer"]
# ``startup``: ready once every route got a token once; ``strict``: unready while any route
# has no usable token (sidecar/ops/readiness.py).
ReadinessPolicy = Literal["startup", "strict"]
READINESS_POLICIES: tuple[ReadinessPolicy, ...] = ("startup", "strict")
# A route's kind of credential (sidecar/credentials/kinds/): an OAuth access token (dpop,
# bearer) from its authorization server, or secrets read from files (header).
# aws_sigv4: requests signed with session credentials from an ``aws_sts`` server.
CredentialKind = Literal["dpop", "bearer", "header", "aws_sigv4"]
CREDENTIAL_KINDS: tuple[CredentialKind, ...] = ("dpop", "bearer", "header", "aws_sigv4")
OAUTH_KINDS = frozenset({"dpop", "bearer"})
SERVER_KINDS = ("oauth", "aws_sts", "google_sts")
# Kinds that get what they attach from an authorization server, and the server kinds they take.
SERVER_KIND_OF = {
    "dpop": ("oauth",),
    "bearer": ("oauth", "google_sts"),
    "aws_sigv4": ("aws_sts",),
}
GOOGLE_STS = "https://sts.googleapis.com/v1/token"
GOOGLE_IAM_CREDENTIALS = "https://iamcredentials.googleapis.com"
# //iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X
_GOOGLE_PROVIDER = re.compile(
    r"^//iam\.googleapis\.com/projects/\d+/locations/[a-z0-9-]+/workloadIdentityPools/"
    r"[a-z0-9-]{4,32}/providers/[a-z0-9-]{4,32}$"
)
_GOOGLE_SA = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]@[a-z0-9.-]+\.iam\.gserviceaccount\.com$")
AWS_STS_AUDIENCE = "sts.amazonaws.com"
# IAM: RoleSessionName is [\w+=,.@-]{2,64}; a role ARN's partition, account and path.
_AWS_SESSION = re.compile(r"^[\w+=,.@-]{2,64}$", re.ASCII)
_AWS_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$", re.ASCII)
_AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
_AWS_SERVICE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

CLIENT_AUTHS: tuple[ClientAuth, ...] = ("jwt_svid", "jwt_bearer", "mtls", "client_secret", "none")
GRANTS: tuple[Grant, ...] = ("client_credentials", "token_exchange", "jwt_bearer")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 §9.2.1
_METHOD_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 §9.1: method = token
MethodOverride = Literal["refuse", "strip", "honour"]
CLEARTEXT_FLAG = "allow_cleartext_development_only"
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3 scope-token
_FIELD_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 §5.1: a token
_PREFIX = re.compile(r"^[\x20-\x7e]*$")  # visible ASCII and spaces: no CR, LF or NUL
# Header names a static secret may not take: the forwarder's own (framing, Host) and the
# hop-by-hop ones (RFC 9110 §7.6.1) are removed or rewritten on the way.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "via",
    }
)


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class AuthorizationServer:
    name: str
    issuer: str | None
    token_endpoint: str | None
    ca_file: Path | None
    client_auth: ClientAuth
    grant: Grant
    dpop: bool
    client_id: str | None  # None: the SPIFFE ID
    svid_audience: str | None  # None: the issuer (or the token endpoint when no issuer)
    timeout: float
    client_secret_file: Path | None = None  # client_auth: client_secret
    subject_token_type: str = "urn:ietf:params:oauth:token-type:jwt"  # grant: token_exchange
    requested_token_type: str | None = None  # grant: token_exchange; sent only when set
    allow_cleartext: bool = False  # allow_cleartext_development_only: http:// issuer/endpoint
    kind: Literal["oauth", "aws_sts", "google_sts"] = "oauth"
    role_arn: str | None = None  # aws_sts: the role AssumeRoleWithWebIdentity assumes
    session_name: str | None = None  # aws_sts: None: derived from the SPIFFE ID
    duration: int = 3600  # aws_sts: DurationSeconds; google_sts: generateAccessToken lifetime
    provider: str | None = None  # google_sts: the workload identity pool provider (audience)
    service_account: str | None = None  # google_sts: impersonated with generateAccessToken
    impersonation_endpoint: str = GOOGLE_IAM_CREDENTIALS  # google_sts: IAM Credentials API
    request_encoding: Literal["form", "json"] = "form"  # oauth: the token request's body
    extra_fields: tuple[tuple[str, str], ...] = ()  # oauth: vendor fields of token requests

    @property
    def jwt_svid_audience(self) -> str:
        aud = self.svid_audience or self.issuer or self.token_endpoint
        assert aud is not None  # guaranteed by validation: issuer or token_endpoint is set
        return aud


@dataclass(frozen=True)
class ScopeRule:
    methods: frozenset[str]  # empty: any method
    paths: tuple[str, ...]  # globs: '*' one segment, '**' any depth
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class StaticHeader:
    """``credential: header``: one header whose value is ``prefix`` + the file's content."""

    name: str  # as configured (sent with this spelling)
    file: Path
    prefix: str = ""


@dataclass(frozen=True)
class Destination:
    name: str
    host: str  # exact host, or '*.suffix'
    upstream: str  # scheme://host[:port], no path; '' = https://<requested host>
    authorization_server: str
    resource: str | None
    audience: str | None
    token_type: TokenType
    default_scopes: tuple[str, ...] | None  # None: requests matching no rule are refused
    rules: tuple[ScopeRule, ...]
    ca_file: Path | None
    allow_private: bool
    connect_timeout: float
    read_timeout: float
    total_timeout: float | None = None
    max_connections: int = 64  # per upstream origin
    queue_timeout: float = 5.0  # seconds a request may wait for one of those connections
    app_credentials: Literal["strip", "refuse"] = "strip"
    via: bool = False
    tunnel: bool = False  # CONNECT to this host: a blind TCP tunnel, no credential
    tunnel_ports: tuple[int, ...] = (443,)
    local_port: int | None = None  # origin-form requests on 127.0.0.1:<local_port> go here
    method_override: MethodOverride = "refuse"  # X-HTTP-Method-Override & co., _method=
    raw_paths: bool = False  # forward encoded dots/slashes as sent (only literal '..' refused)
    allow_cleartext: bool = False  # allow_cleartext_development_only: an http:// upstream
    credential: CredentialKind = "dpop"  # the route's kind (token_type for the OAuth ones)
    headers: tuple[StaticHeader, ...] = ()  # credential: header
    aws_service: str | None = None  # credential: aws_sigv4 (configured or derived from host)
    aws_region: str | None = None
    intercept: bool = False  # CONNECT host:443 -> TLS with a pod-CA leaf, requests routed here
    # Transparent capture: a Host/SNI naming this route on a connection to an address the name
    # does not resolve to is logged ("log") or also refused ("refuse").
    on_address_mismatch: Literal["log", "refuse"] = "log"

    @property
    def has_server(self) -> bool:
        """Whether the route's credential comes from an authorization server (an OAuth token
        or, for aws_sigv4, STS session credentials)."""
        return not self.tunnel and self.credential in SERVER_KIND_OF


@dataclass(frozen=True)
class Intercept:
    """TLS interception (docs/https.md): where the pod CA lives and what the app reads."""

    ca_dir: Path | None = None  # the sidecar's own emptyDir: the CA survives a sidecar restart
    ca_from: Path | None = None  # a mounted Secret (tls.crt, tls.key) holding a provided CA
    export_dir: Path | None = None  # the app-mounted volume: ca.pem, ca-bundle.pem, truststore
    leaf_hours: float = 12.0


@dataclass(frozen=True)
class SvidFileSet:
    """``spiffe.files``: SVIDs written by spiffe-helper, tbot or the SPIFFE CSI driver."""

    x509_svid: Path | None  # PEM chain, leaf first
    x509_key: Path | None  # PKCS#8 PEM
    bundle: Path | None  # PEM trust bundle the chain must be issued by
    jwt_svids: Mapping[str, Path]  # audience -> file holding the JWT-SVID for it
    interval: float = 2.0  # seconds between checks for a rotated file

    @property
    def paths(self) -> tuple[Path, ...]:
        found = (self.x509_svid, self.x509_key, self.bundle, *self.jwt_svids.values())
        return tuple(p for p in found if p is not None)


@dataclass(frozen=True)
class Transparent:
    """``transparent:``: the listener the pod's nat rules redirect outbound TCP to."""

    listen: Address
    ipv6: bool = True  # also listen on [::1]:<port> (ip6tables REDIRECT goes there)
    unmatched: Literal["passthrough", "deny"] = "passthrough"
    peek_timeout: float = 1.0  # seconds to wait for a first byte (server-first protocols)


@dataclass(frozen=True)
class Config:
    listen: Address
    admin: Address | None
    spiffe_socket: str  # '' when the identity comes from files
    authorization_servers: Mapping[str, AuthorizationServer]
    destinations: tuple[Destination, ...]
    source: Path | None = None
    log_level: str = "info"
    log_format: Literal["json", "console"] = "json"
    max_header_bytes: int = 16 * 1024
    replay_buffer_bytes: int = 1024 * 1024
    max_app_connections: int = 4096  # open connections from the app; more are closed at once
    extra: Mapping[str, Any] = field(default_factory=dict)
    prefetch: bool = True  # fetch each route's default token at start (readiness needs it)
    audit_query: bool = False  # put query strings in the audit log
    watch: bool = True  # reload when the config file changes
    watch_interval: float = 2.0
    token_wait: float = 3.0  # tokens.wait: longest a request waits for a token request
    readiness: ReadinessPolicy = "startup"
    audit: bool = True  # audit.enabled: the audit stream, whatever log.level says
    intercept: Intercept = field(default_factory=Intercept)
    spiffe_files: SvidFileSet | None = None  # identity from files instead of the socket

    @property
    def intercept_hosts(self) -> tuple[str, ...]:
        """The hosts of intercepting routes: the pod CA's name constraints."""
        return tuple(d.host for d in self.destinations if d.intercept)

    transparent: Transparent | None = None  # None: no transparent listener


# ---------------------------------------------------------------------------------------------
# Validation. A _Node wraps a YAML value with its path and a shared problem list, so every check
# reports where it is and validation always runs to the end.

T = TypeVar("T")


class _Node:
    def __init__(self, value: Any, path: str, problems: list[str]) -> None:
        self.value = value
        self.path = path
        self.problems = problems

    def problem(self, message: str, path: str | None = None) -> None:
        self.problems.append(f"{path or self.path or '<root>'}: {message}")

    def child(self, key: str | int) -> _Node:
        path = f"{self.path}[{key}]" if isinstance(key, int) else _join(self.path, key)
        value = self.value.get(key) if isinstance(self.value, dict) else None
        if isinstance(key, int) and isinstance(self.value, list):
            value = self.value[key]
        return _Node(value, path, self.problems)

    def mapping(self, allowed: set[str]) -> bool:
        if not isinstance(self.value, dict):
            self.problem(f"must be a mapping, got {_kind(self.value)}")
            return False
        for key in self.value:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.problem(f"unknown key (allowed: {hint})", _join(self.path, _key(key)))
        return True

    def items(self) -> Iterator[_Node]:
        if not isinstance(self.value, list):
            self.problem(f"must be a list, got {_kind(self.value)}")
            return
        for index in range(len(self.value)):
            yield self.child(index)

    def get(
        self, key: str, kind: type[T], default: T | None = None, *, required: bool = False
    ) -> T | None:
        node = self.child(key)
        if node.value is None:
            if required:
                node.problem("is required")
            return default
        # YAML booleans are ints in Python; keep the two apart.
        if not isinstance(node.value, kind) or (kind is int and isinstance(node.value, bool)):
            if kind is float and isinstance(node.value, int) and not isinstance(node.value, bool):
                return float(node.value)  # type: ignore[return-value]
            node.problem(f"must be {kind.__name__}, got {_kind(node.value)}")
            return default
        return node.value

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        assert value is not None
        if value not in options:
            self.child(key).problem(f"must be one of {', '.join(options)}")
            return default
        return value

    def check(self, key: str, validator: Callable[[str], str | None]) -> str | None:
        value = self.get(key, str)
        if value is not None and (message := validator(value)):
            self.child(key).problem(message)
            return None
        return value


def _key(key: object) -> str:
    """A key as a path part: printable and short (a mis-indented secret can become a key)."""
    text = str(key)
    if len(text) > 40 or not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        return "<key>"
    return text


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _https_url(value: str, *, allow_path: bool = True, cleartext: bool = False) -> str | None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "must be an absolute http(s) URL (https; http only for development, see below)"
    if parts.scheme == "http" and not cleartext:
        return (
            "http:// sends tokens, proofs and client assertions unencrypted: use https, or set "
            f"{CLEARTEXT_FLAG}: true beside it for a development setup"
        )
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an absolute http(s) URL (https; http only for development, see below)"
    if parts.fragment or parts.query:
        return "must not have a query or fragment"
    if parts.username or parts.password:
        return "must not contain credentials"
    if not allow_path and parts.path not in ("", "/"):
        return "must be an origin (scheme://host[:port]) without a path"
    return None


def _absolute_uri(value: str) -> str | None:
    # RFC 8707 §2: an absolute URI without a fragment.
    parts = urlsplit(value)
    if not parts.scheme or "#" in value:
        return "must be an absolute URI without a fragment (RFC 8707)"
    return None


def _host_pattern(value: str) -> str | None:
    host = value[2:] if value.startswith("*.") else value
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None if not value.startswith("*.") else "a wildcard cannot apply to an IP address"
    except ValueError:
        pass
    labels = host.split(".")
    if not all(_HOST_LABEL.match(label) for label in labels):
        return "must be a lower-case host name (or '*.' followed by one), without port or scheme"
    if labels[-1].isdigit():
        return "a host name cannot end in a numeric label (it would read as an IPv4 address)"
    return None


def _address(
    node: _Node, key: str, default: str | None, env: tuple[str, str | None] = ("", None)
) -> Address | None:
    """``host:port`` from the document, unless the environment variable ``env`` overrides it."""
    variable, override = env
    text = override if override else node.get(key, str, default)
    if text is None:
        return None
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        where = f"(from ${variable}) " if override else ""
        node.child(key).problem(f"{where}must be host:port")
        return None
    return Address(host, int(port_text))


def _scopes(node: _Node) -> tuple[str, ...]:
    scopes: list[str] = []
    for item in node.items():
        if not isinstance(item.value, str) or not _SCOPE_TOKEN.match(item.value):
            item.problem("must be a scope token (printable, no spaces or quotes)")
        else:
            scopes.append(item.value)
    return tuple(sorted(set(scopes)))


def _glob(node: _Node) -> str | None:
    value = node.value
    if not isinstance(value, str) or not value.startswith("/"):
        node.problem("must be a path glob starting with '/'")
        return None
    for segment in value.split("/"):
        if "*" in segment and segment not in ("*", "**"):
            node.problem("'*' and '**' must stand for a whole path segment")
            return None
    return value


def _rule(node: _Node) -> ScopeRule | None:
    if not node.mapping({"methods", "paths", "scopes"}):
        return None
    methods: set[str] = set()
    if node.child("methods").value is not None:
        for item in node.child("methods").items():
            method = item.value.upper() if isinstance(item.value, str) else None
            if method is None or not _METHOD_TOKEN.match(method):
                item.problem("must be an HTTP method (an RFC 9110 token such as GET or PROPFIND)")
            else:
                methods.add(method)
    paths = tuple(p for p in map(_glob, node.child("paths").items()) if p)
    if node.child("paths").value is None:
        node.child("paths").problem("is required (use ['/**'] for every path)")
    if node.child("scopes").value is None:
        node.child("scopes").problem("is required")
    return ScopeRule(frozenset(methods), paths, _scopes(node.child("scopes")))


def _authorization_server(name: str, node: _Node, base: Path) -> AuthorizationServer | None:
    keys = {
        "issuer",
        "token_endpoint",
        "ca_file",
        "client_auth",
        "grant",
        "dpop",
        "client_id",
        "svid_audience",
        "timeout",
        "client_secret_file",
        "subject_token_type",
        "requested_token_type",
        CLEARTEXT_FLAG,
        "kind",
        "region",
        "role_arn",
        "session_name",
        "duration",
        "provider",
        "service_account",
        "impersonation_endpoint",
        "lifetime",
        "request_encoding",
        "extra_fields",
    }
    if not node.mapping(keys):
        return None
    kind = node.choice("kind", SERVER_KINDS, "oauth")
    if kind != "oauth":
        for key in ("request_encoding", "extra_fields"):
            if node.child(key).value is not None:
                node.child(key).problem(f"is not used with kind: {kind}")
    if kind == "aws_sts":
        return _aws_sts(name, node, base)
    if kind == "google_sts":
        return _google_sts(name, node, base)
    for key in ("region", "role_arn", "session_name", "duration"):
        if node.child(key).value is not None:
            node.child(key).problem("is only used with kind: aws_sts")
    for key in ("provider", "service_account", "impersonation_endpoint", "lifetime"):
        if node.child(key).value is not None:
            node.child(key).problem("is only used with kind: google_sts")
    cleartext = bool(node.get(CLEARTEXT_FLAG, bool, False))
    issuer = node.check("issuer", lambda v: _https_url(v, cleartext=cleartext))
    token_endpoint = node.check("token_endpoint", lambda v: _https_url(v, cleartext=cleartext))
    if (
        issuer is None
        and token_endpoint is None
        and not any(
            p.startswith((f"{node.path}.issuer", f"{node.path}.token_endpoint"))
            for p in node.problems
        )
    ):
        node.problem("needs an issuer (for discovery) or a token_endpoint")
    client_auth = node.choice("client_auth", CLIENT_AUTHS, "jwt_svid")
    secret_file = _file(node, "client_secret_file", base)
    if client_auth == "client_secret":
        if secret_file is None:
            node.problem(
                "client_auth client_secret needs client_secret_file",
                f"{node.path}.client_secret_file",
            )
        if node.get("client_id", str) is None:
            node.problem("client_auth client_secret needs client_id", f"{node.path}.client_id")
    elif secret_file is not None:
        node.child("client_secret_file").problem("is only used with client_auth: client_secret")
    return AuthorizationServer(
        name=name,
        issuer=issuer.rstrip("/") if issuer and urlsplit(issuer).path == "/" else issuer,
        token_endpoint=token_endpoint,
        ca_file=_file(node, "ca_file", base),
        client_auth=client_auth,  # type: ignore[arg-type]
        grant=node.choice("grant", GRANTS, "client_credentials"),  # type: ignore[arg-type]
        dpop=bool(node.get("dpop", bool, True)),
        client_id=node.get("client_id", str),
        svid_audience=node.get("svid_audience", str),
        timeout=_positive(node, "timeout", 10.0),
        client_secret_file=secret_file,
        subject_token_type=node.get("subject_token_type", str)
        or "urn:ietf:params:oauth:token-type:jwt",
        requested_token_type=node.get("requested_token_type", str),
        allow_cleartext=cleartext,
        request_encoding=node.choice("request_encoding", ("form", "json"), "form"),  # type: ignore[arg-type]
        extra_fields=_extra_fields(node.child("extra_fields")),
    )


# What the token client sets itself: a vendor field may not replace any of them.
_STANDARD_FIELDS = frozenset(
    {
        "grant_type",
        "subject_token",
        "subject_token_type",
        "requested_token_type",
        "assertion",
        "client_assertion",
        "client_assertion_type",
        "client_id",
        "client_secret",
        "resource",
        "audience",
        "scope",
    }
)
_FIELD = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def _extra_fields(node: _Node) -> tuple[tuple[str, str], ...]:
    """``extra_fields: {name: value}``: vendor fields sent with every token request (e.g. an
    AI vendor's identity provider and service account ids). Strings only: never a secret."""
    if node.value is None:
        return ()
    if not isinstance(node.value, dict):
        node.problem(f"must be a mapping of field names to strings, got {_kind(node.value)}")
        return ()
    fields: list[tuple[str, str]] = []
    for name, value in node.value.items():
        where = _join(node.path, str(name))
        if not isinstance(name, str) or not _FIELD.match(name):
            node.problem("must be a field name (letters, digits, _ . -)", where)
        elif name in _STANDARD_FIELDS:
            node.problem(f"{name} is set by the sidecar itself", where)
        elif not isinstance(value, str) or not value or len(value) > 512:
            node.problem("must be a non-empty string (at most 512 characters)", where)
        else:
            fields.append((name, value))
    return tuple(fields)


def _aws_sts(name: str, node: _Node, base: Path) -> AuthorizationServer | None:
    """``kind: aws_sts``: AssumeRoleWithWebIdentity with the JWT-SVID as web identity token."""
    for key in (
        CLEARTEXT_FLAG,  # STS is https only
        "issuer",
        "client_auth",
        "grant",
        "dpop",
        "client_id",
        "client_secret_file",
        "subject_token_type",
        "requested_token_type",
    ):
        if node.child(key).value is not None:
            node.child(key).problem("is not used with kind: aws_sts")
    region = node.check(
        "region", lambda v: None if _AWS_REGION.match(v) else "must be an AWS region"
    )
    endpoint = node.check("token_endpoint", _https_url)
    if region is None and endpoint is None and node.child("region").value is None:
        node.child("region").problem("is required (or a token_endpoint: the STS endpoint)")
    role_arn = node.check(
        "role_arn", lambda v: None if _AWS_ROLE_ARN.match(v) else "must be an IAM role ARN"
    )
    if node.child("role_arn").value is None:
        node.child("role_arn").problem("is required")
    session = node.check(
        "session_name",
        lambda v: None if _AWS_SESSION.match(v) else r"must match [\w+=,.@-]{2,64} (IAM)",
    )
    # IAM: 900 s to the role's maximum session duration (at most 12 h).
    duration = _port_like(node, "duration", 3600, 900, 43200) or 3600
    return AuthorizationServer(
        name=name,
        issuer=None,
        token_endpoint=endpoint or (f"https://sts.{region}.amazonaws.com/" if region else None),
        ca_file=_file(node, "ca_file", base),
        client_auth="none",
        grant="token_exchange",  # the JWT-SVID is exchanged: it is fetched for every request
        dpop=False,
        client_id=None,
        svid_audience=node.get("svid_audience", str) or AWS_STS_AUDIENCE,
        timeout=_positive(node, "timeout", 10.0),
        kind="aws_sts",
        role_arn=role_arn,
        session_name=session,
        duration=duration,
    )


def _google_sts(name: str, node: _Node, base: Path) -> AuthorizationServer | None:
    """``kind: google_sts``: workload identity federation (RFC 8693 at Google's STS with the
    JWT-SVID), then, with ``service_account``, IAM Credentials generateAccessToken."""
    for key in (
        CLEARTEXT_FLAG,  # Google's endpoints are https only
        "issuer",
        "client_auth",
        "grant",
        "dpop",
        "client_id",
        "client_secret_file",
        "subject_token_type",
        "requested_token_type",
        "region",
        "role_arn",
        "session_name",
        "duration",
    ):
        if node.child(key).value is not None:
            node.child(key).problem("is not used with kind: google_sts")
    provider = node.check(
        "provider",
        lambda v: (
            None
            if _GOOGLE_PROVIDER.match(v)
            else "must be //iam.googleapis.com/projects/<number>/locations/global/"
            "workloadIdentityPools/<pool>/providers/<provider>"
        ),
    )
    if node.child("provider").value is None:
        node.child("provider").problem("is required (the workload identity pool provider)")
    account = node.check(
        "service_account",
        lambda v: None if _GOOGLE_SA.match(v) else "must be a service account e-mail address",
    )
    iam = node.check("impersonation_endpoint", lambda v: _https_url(v, allow_path=False))
    if node.child("lifetime").value is not None and account is None:
        node.child("lifetime").problem("is only used with service_account")
    # IAM Credentials: up to 1 h, 12 h where the organisation policy allows it.
    lifetime = _port_like(node, "lifetime", 3600, 1, 43200) or 3600
    return AuthorizationServer(
        name=name,
        issuer=None,
        token_endpoint=node.check("token_endpoint", _https_url) or GOOGLE_STS,
        ca_file=_file(node, "ca_file", base),
        client_auth="none",
        grant="token_exchange",
        dpop=False,
        client_id=None,
        # Google's default allowed audience: the provider's resource name with "https:".
        svid_audience=node.get("svid_audience", str) or (f"https:{provider}" if provider else None),
        timeout=_positive(node, "timeout", 10.0),
        kind="google_sts",
        provider=provider,
        service_account=account,
        impersonation_endpoint=(iam or GOOGLE_IAM_CREDENTIALS).rstrip("/"),
        duration=lifetime,
    )


def aws_scope(host: str) -> tuple[str, str] | None:
    """(service, region) from a standard AWS endpoint host: ``<svc>.<region>.amazonaws.com``,
    ``<bucket>.s3.<region>.amazonaws.com``, ``s3.amazonaws.com`` and other global endpoints
    (us-east-1); ``*.`` wildcards by their suffix. None when the host is not one."""
    labels = host.removeprefix("*.").split(".")
    if labels[-2:] != ["amazonaws", "com"] or len(labels) < 3:
        return None
    inner = labels[:-2]
    if len(inner) >= 2 and _AWS_REGION.match(inner[-1]):
        service = inner[-2]
        if service.startswith("s3") and service != "s3":  # s3-accelerate, s3-fips, ...
            service = "s3"
        return service, inner[-1]
    if inner[-1] == "s3" or inner[-1] in ("iam", "sts", "route53", "cloudfront"):
        return inner[-1], "us-east-1"  # global endpoints sign for us-east-1
    return None


def _positive(node: _Node, key: str, default: float) -> float:
    value = node.get(key, float, default)
    assert value is not None
    if value <= 0:
        node.child(key).problem("must be a positive number of seconds")
        return default
    return value


def _file(node: _Node, key: str, base: Path) -> Path | None:
    text = node.get(key, str)
    return None if text is None else (base / text).resolve()


def _destination(node: _Node, servers: Mapping[str, object], base: Path) -> Destination | None:
    keys = {
        "name",
        "host",
        "upstream",
        "authorization_server",
        "resource",
        "audience",
        "token_type",
        "scopes",
        "ca_file",
        "allow_private",
        "connect_timeout",
        "read_timeout",
        "total_timeout",
        "max_connections",
        "queue_timeout",
        "app_credentials",
        "via",
        "tunnel",
        "tunnel_ports",
        "local_port",
        "method_override",
        "raw_paths",
        CLEARTEXT_FLAG,
        "credential",
        "headers",
        "aws",
        "intercept",
        "on_address_mismatch",
    }
    if not node.mapping(keys):
        return None
    host = node.check("host", _host_pattern)
    if node.child("host").value is None:
        node.child("host").problem("is required")
    cleartext = bool(node.get(CLEARTEXT_FLAG, bool, False))
    upstream = node.check(
        "upstream", lambda v: _https_url(v, allow_path=False, cleartext=cleartext)
    )
    tunnel = bool(node.get("tunnel", bool, False))
    named = node.child("authorization_server").value  # checked below; the default needs it now
    default_type = _default_token_type(servers, named if isinstance(named, str) else None)
    token_type = node.choice("token_type", ("dpop", "bearer"), default_type)
    credential = _credential(node, token_type)
    oauth = credential in OAUTH_KINDS
    as_name = node.get(
        "authorization_server", str, required=not tunnel and credential in SERVER_KIND_OF
    )
    headers = _static_headers(node, credential, base)
    aws = _aws_signing(node, credential, host)
    intercept = bool(node.get("intercept", bool, False))
    if intercept and tunnel:
        node.child("intercept").problem(
            "a tunnel route is a blind pipe: it cannot also intercept (choose one)"
        )
    if intercept and host and _is_ip(host):
        node.child("intercept").problem(
            "interception needs a host name: the pod CA's name constraints are DNS names"
        )
    if tunnel:
        for key in ("authorization_server", "scopes", "resource", "audience", "upstream"):
            if node.child(key).value is not None:
                node.child(key).problem(
                    "a tunnel route carries no credential and dials the requested host: remove it"
                )
    if as_name is not None and as_name not in servers:
        known = ", ".join(sorted(servers)) or "none defined"
        node.child("authorization_server").problem(
            f"unknown authorization server {as_name!r} ({known})"
        )
    elif as_name is not None and credential in SERVER_KIND_OF:
        wanted, got = SERVER_KIND_OF[credential], getattr(servers[as_name], "kind", "oauth")
        if got not in wanted:
            node.child("authorization_server").problem(
                f"{as_name!r} is a {got} server; credential {credential} needs "
                f"{' or '.join(wanted)}"
            )
    scopes = node.child("scopes")
    default: tuple[str, ...] | None = None
    rules: tuple[ScopeRule, ...] = ()
    if scopes.value is not None and scopes.mapping({"default", "rules"}):
        if scopes.child("default").value is not None:
            default = _scopes(scopes.child("default"))
        if scopes.child("rules").value is not None:
            rules = tuple(r for r in map(_rule, scopes.child("rules").items()) if r)
    return Destination(
        name=node.get("name", str) or host or "?",
        host=(host or "").lower(),
        upstream=(upstream or "").rstrip("/"),
        authorization_server=as_name or "",
        resource=node.check("resource", _absolute_uri),
        audience=node.get("audience", str),
        token_type=token_type,  # type: ignore[arg-type]
        default_scopes=default if oauth or tunnel else (),  # no token, no scopes to choose
        credential=credential,  # type: ignore[arg-type]
        headers=headers,
        aws_service=aws[0] if aws else None,
        aws_region=aws[1] if aws else None,
        rules=rules,
        ca_file=_file(node, "ca_file", base),
        allow_private=bool(node.get("allow_private", bool, False)),
        connect_timeout=_positive(node, "connect_timeout", 5.0),
        read_timeout=_positive(node, "read_timeout", 60.0),
        total_timeout=_positive(node, "total_timeout", 1.0)
        if node.child("total_timeout").value is not None
        else None,
        max_connections=_port_like(node, "max_connections", 64, 1, 10_000) or 64,
        queue_timeout=_positive(node, "queue_timeout", 5.0),
        app_credentials=node.choice("app_credentials", ("strip", "refuse"), "strip"),  # type: ignore[arg-type]
        via=bool(node.get("via", bool, False)),
        tunnel=tunnel,
        tunnel_ports=_ports(node.child("tunnel_ports")) if tunnel else (443,),
        local_port=_port_like(node, "local_port", None, 1, 65535),
        method_override=node.choice(  # type: ignore[arg-type]
            "method_override", ("refuse", "strip", "honour"), "refuse"
        ),
        raw_paths=bool(node.get("raw_paths", bool, False)),
        allow_cleartext=cleartext,
        intercept=intercept,
        on_address_mismatch=node.choice("on_address_mismatch", ("log", "refuse"), "log"),  # type: ignore[arg-type]
    )


def _transparent(node: _Node, override: str | None) -> Transparent | None:
    if node.value is None and override:
        node = _Node({}, node.path, node.problems)
    if node.value is None or not node.mapping({"listen", "ipv6", "unmatched", "peek_timeout"}):
        return None
    listen = _address(node, "listen", "127.0.0.1:15006", (ENV_TRANSPARENT, override))
    if listen is not None and listen.host != "127.0.0.1":
        # iptables REDIRECT of locally generated packets goes to 127.0.0.1 (and ::1).
        node.child("listen").problem("must be 127.0.0.1:<port> (where REDIRECT delivers)")
    if listen is not None and listen.port == 0:
        node.child("listen").problem("needs a fixed port: the nat rules redirect to it")
    return Transparent(
        listen=listen or Address("127.0.0.1", 15006),
        ipv6=bool(node.get("ipv6", bool, True)),
        unmatched=node.choice("unmatched", ("passthrough", "deny"), "passthrough"),  # type: ignore[arg-type]
        peek_timeout=_positive(node, "peek_timeout", 1.0),
    )


def _credential(node: _Node, token_type: str) -> str:
    """The route's kind: ``credential``, else ``token_type`` (dpop or bearer). A kind that is
    not an OAuth token takes no authorization server, scopes or token settings."""
    if node.child("credential").value is None:
        return token_type
    credential = node.choice("credential", CREDENTIAL_KINDS, token_type)
    if credential in OAUTH_KINDS:
        if node.child("token_type").value is not None and credential != token_type:
            node.child("token_type").problem(f"contradicts credential: {credential}")
        return credential
    if bool(node.get("tunnel", bool, False)):
        node.child("credential").problem("a tunnel route carries no credential: remove it")
    for key in ("authorization_server", "scopes", "resource", "audience", "token_type"):
        if credential == "aws_sigv4" and key == "authorization_server":
            continue  # its aws_sts server
        if node.child(key).value is not None:
            node.child(key).problem(f"is for OAuth routes; credential: {credential} takes none")
    return credential


def _aws_signing(node: _Node, credential: str, host: str | None) -> tuple[str, str] | None:
    """``aws: {service, region}`` of an aws_sigv4 route, else derived from its host."""
    aws = node.child("aws")
    if credential != "aws_sigv4":
        if aws.value is not None:
            aws.problem("is only used with credential: aws_sigv4")
        return None
    derived = aws_scope(host) if host else None
    service, region = derived or (None, None)
    if aws.value is not None and aws.mapping({"service", "region"}):
        service = (
            aws.check(
                "service",
                lambda v: None if _AWS_SERVICE.match(v) else "must be an AWS service name",
            )
            or service
        )
        region = (
            aws.check("region", lambda v: None if _AWS_REGION.match(v) else "must be an AWS region")
            or region
        )
    if (service is None or region is None) and host:
        aws.problem(
            f"cannot derive the signing service and region from host {host!r}: set "
            "aws: {service: ..., region: ...}"
        )
        return None
    return (service, region) if service and region else None


def _static_headers(node: _Node, credential: str, base: Path) -> tuple[StaticHeader, ...]:
    """``headers: [{name, file, prefix}]`` of a ``credential: header`` route."""
    headers_node = node.child("headers")
    if credential != "header":
        if headers_node.value is not None:
            headers_node.problem("is only used with credential: header")
        return ()
    if headers_node.value is None:
        headers_node.problem("credential: header needs headers: [{name, file}]")
        return ()
    if isinstance(headers_node.value, list) and not headers_node.value:
        headers_node.problem("must name at least one header")
    found: list[StaticHeader] = []
    seen: set[str] = set()
    for item in headers_node.items():
        if not item.mapping({"name", "file", "prefix"}):
            continue
        name = item.get("name", str, required=True)
        path = _file(item, "file", base)
        if item.child("file").value is None:
            item.child("file").problem("is required (the mounted secret's path)")
        prefix = item.get("prefix", str, "") or ""
        if not _PREFIX.match(prefix):
            item.child("prefix").problem("must be printable ASCII (no line breaks)")
        if name is not None:
            lower = name.lower()
            if not _FIELD_NAME.match(name):
                item.child("name").problem("must be an HTTP header name (RFC 9110 §5.1)")
            elif lower in _RESERVED_HEADERS or lower.startswith("proxy-"):
                item.child("name").problem(f"{name} is set by the proxy itself; choose another")
            elif lower in seen:
                item.child("name").problem(f"{name} is named twice on this route")
            seen.add(lower)
        if name is not None and path is not None:
            found.append(StaticHeader(name, path, prefix))
    return tuple(found)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _intercept(root: _Node, env: Mapping[str, str], base: Path) -> Intercept:
    node = root.child("intercept")
    settings: dict[str, Any] = {}
    if node.value is not None and node.mapping({"ca_dir", "ca_from", "export_dir", "leaf_hours"}):
        settings = {
            "ca_dir": _file(node, "ca_dir", base),
            "ca_from": _file(node, "ca_from", base),
            "export_dir": _file(node, "export_dir", base),
            "leaf_hours": _positive(node, "leaf_hours", 12.0),
        }
    for key, variable in (("ca_dir", ENV_CA_DIR), ("export_dir", ENV_TRUST_DIR)):
        if env.get(variable):
            settings[key] = Path(env[variable]).absolute()
    result = Intercept(**settings)
    if result.leaf_hours > 24 * 7:
        node.child("leaf_hours").problem("leaf certificates are short-lived: at most 168 hours")
    if result.ca_from is not None and result.ca_dir is not None:
        node.child("ca_dir").problem("a provided CA (ca_from) is not kept: set one of the two")
    keys = [p for p in (result.ca_dir, result.ca_from) if p is not None]
    export = result.export_dir
    if export is not None and any(export == k or k.is_relative_to(export) for k in keys):
        node.child("export_dir").problem(
            "the app mounts export_dir: the CA key directory must not be inside it"
        )
    return result


def _svid_files(node: _Node, base: Path) -> SvidFileSet | None:
    if not node.mapping({"x509_svid", "x509_key", "bundle", "jwt_svids", "interval"}):
        return None
    x509_svid, x509_key = _file(node, "x509_svid", base), _file(node, "x509_key", base)
    if (x509_svid is None) != (x509_key is None):
        node.problem("x509_svid and x509_key go together", f"{node.path}.x509_key")
    jwt_svids: dict[str, Path] = {}
    jwt_node = node.child("jwt_svids")
    if jwt_node.value is not None and jwt_node.mapping(
        {str(k) for k in jwt_node.value} if isinstance(jwt_node.value, dict) else set()
    ):
        for audience in jwt_node.value:
            path = _file(jwt_node, str(audience), base)
            if path is not None:
                jwt_svids[str(audience)] = path
    if x509_svid is None and not jwt_svids:
        node.problem("needs x509_svid and x509_key, or jwt_svids (audience: file), or both")
    return SvidFileSet(
        x509_svid=x509_svid,
        x509_key=x509_key,
        bundle=_file(node, "bundle", base),
        jwt_svids=jwt_svids,
        interval=_positive(node, "interval", 2.0),
    )


def _default_token_type(servers: Mapping[str, object], as_name: str | None) -> str:
    """A route's token_type defaults to its authorization server's ``dpop`` setting; the
    route's own ``token_type`` wins when it is set."""
    server = servers.get(as_name or "")
    # Other kinds of server (aws_sts, google_sts) are not about DPoP: their routes keep the
    # default and get their own validation.
    if isinstance(server, AuthorizationServer) and server.kind == "oauth" and not server.dpop:
        return "bearer"
    return "dpop"


def _port_like(node: _Node, key: str, default: int | None, low: int, high: int) -> int | None:
    value = node.child(key).value
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        node.child(key).problem(f"must be an integer from {low} to {high}")
        return default
    return value


def _ports(node: _Node) -> tuple[int, ...]:
    if node.value is None:
        return (443,)
    if not isinstance(node.value, list) or not node.value:
        node.problem("must be a non-empty list of ports")
        return (443,)
    ports = []
    for index, value in enumerate(node.value):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            node.problem("must be a port number (1-65535)", f"{node.path}[{index}]")
        else:
            ports.append(value)
    return tuple(ports)


def _needs_server(destinations: object) -> bool:
    """Whether a route of the document takes an OAuth token (then a server must be named)."""
    if not isinstance(destinations, list):
        return True
    return any(
        not isinstance(d, dict)
        or (not d.get("tunnel") and d.get("credential", "dpop") in SERVER_KIND_OF)
        for d in destinations
    )


def parse(
    doc: object, *, source: Path | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Validate a config document; raise ConfigError with every problem found."""
    env = os.environ if env is None else env
    base = source.parent if source else Path.cwd()
    return _parse(_Node(doc, "", []), source, env, base)


def _parse(root: _Node, source: Path | None, env: Mapping[str, str], base: Path) -> Config:
    problems = root.problems
    if not root.mapping(
        {
            "listen",
            "admin",
            "allow_non_loopback",
            "allow_non_loopback_admin",
            "spiffe",
            "unmatched",
            "authorization_servers",
            "destinations",
            "log",
            "limits",
            "tokens",
            "reload",
            "readiness",
            "audit",
            "intercept",
            "transparent",
        }
    ):
        raise ConfigError(problems)
    listen = _address(root, "listen", "127.0.0.1:15001", (ENV_LISTEN, env.get(ENV_LISTEN)))
    admin = _address(root, "admin", "127.0.0.1:15000", (ENV_ADMIN, env.get(ENV_ADMIN)))
    # The admin port serves health and metrics, never a credential: an address set for it in
    # the pod spec ($SIDECAR_ADMIN, so the kubelet can probe it) is an explicit choice. The
    # proxy port is the pod's identity: only the config file's flag opens it.
    admin_opted_in = bool(env.get(ENV_ADMIN))
    for key, addr, flag, opted_in in (
        ("listen", listen, "allow_non_loopback", False),
        ("admin", admin, "allow_non_loopback_admin", admin_opted_in),
    ):
        if addr and not addr.is_loopback and not opted_in and not root.get(flag, bool, False):
            root.child(key).problem(
                f"{addr} is not a loopback address; the proxy would be reachable from outside "
                f"the pod. Set {flag}: true if that is really intended"
            )
    if root.get("unmatched", str, "deny") != "deny":
        root.child("unmatched").problem(
            "only 'deny' is supported: unknown destinations are refused"
        )

    spiffe = root.child("spiffe")
    socket = env.get(ENV_SPIFFE_SOCKET, "")
    svid_files: SvidFileSet | None = None
    if spiffe.value is not None and spiffe.mapping({"socket", "files"}):
        if spiffe.child("files").value is not None:
            svid_files = _svid_files(spiffe.child("files"), base)
            socket = ""  # the files are the identity; $SPIFFE_ENDPOINT_SOCKET is not used
            if spiffe.child("socket").value is not None:
                spiffe.child("files").problem("use socket or files, not both")
        else:
            socket = spiffe.get("socket", str, socket) or socket
    if svid_files is None and not socket:
        spiffe.problem(f"needs socket (or set ${ENV_SPIFFE_SOCKET}) or files", "spiffe.socket")
    elif svid_files is None and not socket.startswith(("unix:///", "unix:/")):
        spiffe.problem("must be a unix socket address: unix:///absolute/path", "spiffe.socket")

    servers: dict[str, AuthorizationServer] = {}
    as_node = root.child("authorization_servers")
    if as_node.value is None:
        if _needs_server(root.child("destinations").value):
            as_node.problem("is required: name at least one authorization server")
    elif as_node.mapping(set(as_node.value) if isinstance(as_node.value, dict) else set()):
        for name in as_node.value:
            parsed = _authorization_server(str(name), as_node.child(str(name)), base)
            if parsed:
                servers[str(name)] = parsed

    destinations: list[Destination] = []
    seen: dict[str, str] = {}
    dest_node = root.child("destinations")
    if dest_node.value is None:
        dest_node.problem("is required: list the hosts the app may reach")
    for item in dest_node.items():
        dest = _destination(item, servers, base)
        if dest is None:
            continue
        if dest.host and dest.host in seen:
            item.child("host").problem(f"{dest.host!r} is already routed by {seen[dest.host]}")
        seen.setdefault(dest.host, item.path)
        destinations.append(dest)
    transparent = _transparent(root.child("transparent"), env.get(ENV_TRANSPARENT))
    ports: dict[int, str] = {}
    taken = {a.port for a in (listen, admin) if a is not None and a.port}
    if transparent is not None:
        if transparent.listen.port in taken:
            root.problem(
                f"port {transparent.listen.port} is already used by listen or admin",
                "transparent.listen",
            )
        taken.add(transparent.listen.port)
    for index, dest in enumerate(destinations):
        if dest.local_port is None:
            continue
        where = f"destinations[{index}].local_port"
        if dest.local_port in taken or dest.local_port in ports:
            root.problem(f"port {dest.local_port} is already used", where)
        ports[dest.local_port] = where
    names = [d.name for d in destinations]
    for index, name in enumerate(names):
        if names.index(name) != index:
            dest_node.problem(f"route name {name!r} is used twice", f"destinations[{index}].name")

    log = root.child("log")
    level, fmt, audit_query = "info", "json", False
    if log.value is not None and log.mapping({"level", "format", "audit_query"}):
        level = log.choice("level", ("debug", "info", "warning", "error"), "info")
        fmt = log.choice("format", ("json", "console"), "json")
        audit_query = bool(log.get("audit_query", bool, False))
    tokens = root.child("tokens")
    prefetch, token_wait = True, 3.0
    if tokens.value is not None and tokens.mapping({"prefetch", "wait"}):
        prefetch = bool(tokens.get("prefetch", bool, True))
        token_wait = _positive(tokens, "wait", 3.0)
        if token_wait > 60:
            tokens.child("wait").problem("must be at most 60 seconds")
    readiness = root.choice("readiness", READINESS_POLICIES, "startup")
    audit_node = root.child("audit")
    audit = True
    if audit_node.value is not None and audit_node.mapping({"enabled"}):
        audit = bool(audit_node.get("enabled", bool, True))
    reload = root.child("reload")
    watch, interval = True, 2.0
    if reload.value is not None and reload.mapping({"watch", "interval"}):
        watch = bool(reload.get("watch", bool, True))
        interval = _positive(reload, "interval", 2.0)
    limits = root.child("limits")
    max_header, replay, app_connections = 16 * 1024, 1024 * 1024, 4096
    if limits.value is not None and limits.mapping(
        {"max_header_bytes", "replay_buffer_bytes", "max_app_connections"}
    ):
        max_header = int(_positive(limits, "max_header_bytes", max_header))
        replay = int(_positive(limits, "replay_buffer_bytes", replay))
        app_connections = (
            _port_like(limits, "max_app_connections", app_connections, 1, 1_000_000)
            or app_connections
        )

    intercept = _intercept(root, env, base)

    if problems:
        raise ConfigError(problems)
    assert listen is not None
    return Config(
        listen=listen,
        admin=admin,
        spiffe_socket=socket,
        spiffe_files=svid_files,
        authorization_servers=servers,
        destinations=tuple(destinations),
        source=source,
        log_level=level,
        log_format=fmt,  # type: ignore[arg-type]
        max_header_bytes=max_header,
        replay_buffer_bytes=replay,
        max_app_connections=app_connections,
        prefetch=prefetch,
        audit_query=audit_query,
        watch=watch,
        watch_interval=interval,
        token_wait=token_wait,
        readiness=readiness,  # type: ignore[arg-type]
        audit=audit,
        intercept=intercept,
        transparent=transparent,
    )


def cleartext_settings(cfg: Config) -> list[str]:
    """The YAML paths of http:// URLs a development-only flag allowed (warned at every start
    and reload: tokens, proofs or client assertions travel over them unencrypted)."""
    found = [
        f"authorization_servers.{name}.{key}"
        for name, server in cfg.authorization_servers.items()
        for key in ("issuer", "token_endpoint")
        if (getattr(server, key) or "").lower().startswith("http://")
    ]
    found += [
        f"destinations[{index}].upstream"
        for index, dest in enumerate(cfg.destinations)
        if dest.upstream.lower().startswith("http://")
    ]
    return found


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, without quoting the document (it may hold secrets next to the error)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where} not valid YAML ({getattr(exc, 'problem', None) or type(exc).__name__})"


def load(path: Path | str | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate the config file (``--config``, else ``$SIDECAR_CONFIG``)."""
    env = os.environ if env is None else env
    chosen = path or env.get(ENV_CONFIG)
    if not chosen:
        raise ConfigError([f"no config file: pass --config or set ${ENV_CONFIG}"])
    file = Path(chosen)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read ({exc.strerror})"]) from exc
    doc = parse_document(data, str(file))
    # absolute(), not resolve(): a ConfigMap mount is a symlink that is swapped on update.
    return parse(doc, source=file.absolute(), env=env)


def parse_document(data: bytes, where: str) -> object:
    """YAML bytes -> a document, or a ConfigError with one line that quotes nothing of it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{where}: not UTF-8 text (invalid byte at offset {exc.start})"]
        ) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{where}:{yaml_problem(exc)}"]) from exc
    except RecursionError as exc:
        raise ConfigError([f"{where}: not a usable config (nested too deeply)"]) from exc
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:
        # PyYAML's constructors raise these for values such as an impossible date.
        raise ConfigError([f"{where}: not a usable config ({type(exc).__name__})"]) from exc
