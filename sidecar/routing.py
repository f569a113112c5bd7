"""Routing: which destination a request is for, and which scopes it needs. Pure code, no I/O.

A :class:`RoutingTable` is built once per config. :meth:`RoutingTable.resolve` turns the
request target an HTTP_PROXY client sent (absolute-form, RFC 9112 §3.2.2) into a
:class:`Target` on a :class:`Route`, or raises a :class:`~sidecar.errors.ProxyError`.

Host matching: an exact host wins; otherwise ``*.suffix`` matches exactly one more label
(as TLS certificate wildcards do), so ``*.saas.example`` matches ``eu.saas.example`` but neither
``saas.example`` nor ``a.eu.saas.example``. Everything else is denied.

Scope rules: a rule applies when the method is in its ``methods`` (or it lists none) and the path
matches one of its ``paths`` globs (``*`` = one segment, ``**`` = any number of segments). When
several rules apply, the most specific wins, compared in this order:
  1. more literal path segments;      2. fewer ``**``;      3. fewer ``*``;
  4. a rule that lists methods beats one that does not;      5. the earlier rule in the file.
Scopes are matched against the path as sent (no percent-decoding). Paths the upstream could read
as another resource are refused (:func:`path_problem`), so a rule cannot be side-stepped with
``/a/../b``, ``/a/%2e%2e/b``, ``/a/..;/b`` or ``/a%2fb``.

Hosts (:func:`parse_target`, CONNECT authorities too) are parsed once into a validated value: a
sequence of DNS labels (LDH, 1-63 octets each, at most 253 in all, IDNA A-labels that decode),
an IPv4 dotted quad or a bracketed IPv6 literal; anything else is a 400. A trailing dot (an
absolute name) is removed once: ``api.example.`` is ``api.example``. The origin a request is
dialled at (:meth:`Route.dial`) is derived from structured parts (the route's parsed upstream,
or the validated requested host), never from a URL string rebuilt from app input.

Method overrides (``X-HTTP-Method-Override`` and kin, ``_method=`` in the query) would let the
upstream act on a method the scopes were not chosen for: refused by default (per route:
``method_override: strip`` removes them, ``honour`` scopes on the overriding method).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple
from urllib.parse import unquote, unquote_plus, urlsplit

from sidecar.config import AuthorizationServer, Config, Destination, ScopeRule
from sidecar.errors import (
    BadRequest,
    Forbidden,
    Misdirected,
    NoScopeRule,
    NotAProxyRequest,
    UnknownDestination,
)

_DOT_SEGMENT = re.compile(r"(^|/)(\.|%2e){1,2}(/|$)", re.IGNORECASE)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # RFC 1123 §2.1 LDH label
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 token (a method)
_ENCODED_SLASH = re.compile(r"%(?:2f|5c)", re.IGNORECASE)
_ENCODED_CONTROL = re.compile(r"%(?:0[0-9a-f]|1[0-9a-f]|7f)", re.IGNORECASE)
# Escapes some servers decode to '.', '/' or '\' where UTF-8 says they cannot: IIS's %uXXXX,
# and overlong UTF-8 (%c0%ae, %e0%80%ae, %f0%80%80%ae: RFC 3629 §3 forbids them).
_ODD_ESCAPE = re.compile(r"%u[0-9a-f]{4}|%c[01]|%e0%[89]|%f0%8", re.IGNORECASE)
_DECODE_LAYERS = 3  # %2e, %252e, %25252e; a path still encoded after that is refused
_QUERY_SEPARATOR = re.compile(r"([&;])")
_METHOD_PARAM = re.compile(r"(?:^|[&;])_method(?:[=&;\[]|$)", re.IGNORECASE)
OVERRIDE_METHOD_HEADERS = frozenset(
    {"x-http-method-override", "x-http-method", "x-method-override"}
)
OVERRIDE_URL_HEADERS = frozenset({"x-original-url", "x-rewrite-url"})
OVERRIDE_HEADERS = OVERRIDE_METHOD_HEADERS | OVERRIDE_URL_HEADERS


class Target(NamedTuple):
    """Where the app asked to go, split out of the request target. (Per request: a tuple,
    which costs a fraction of a frozen dataclass to build.)"""

    scheme: str
    host: str  # validated (see valid_host): lower-case labels, or an IP literal unbracketed
    port: int
    path: str  # raw, as sent (percent-encoding kept)
    query: str  # raw, without '?'; '' when absent


class Dial(NamedTuple):
    """The origin a request is sent to, from structured parts only."""

    scheme: str
    host: str  # without brackets
    port: int
    explicit_port: int | None  # as written in the upstream (htu keeps it), None: the default
    netloc: str  # the Host header: host[:port], IPv6 bracketed
    synthesised: bool = False  # the host is the app's (validated): resolved as an absolute name

    @property
    def text(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def parse_target(raw_target: str) -> Target:
    """Parse an absolute-form request target (``http://host[:port]/path?query``)."""
    if raw_target[:7] == "http://":  # what HTTP_PROXY clients send
        scheme, rest = "http", raw_target[7:]
    else:
        if raw_target.startswith("/") or raw_target == "*":
            raise NotAProxyRequest(
                "this is the sidecar's proxy port: send requests through it as an HTTP proxy "
                "(set HTTP_PROXY and http_proxy to http://127.0.0.1:<port>) with an absolute URL"
            )
        scheme, sep, rest = raw_target.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("http", "https"):
            raise BadRequest("only http:// URLs can be proxied (use CONNECT for tunnels)")
        if scheme == "https":
            raise BadRequest(
                "send plain http:// URLs to the sidecar: it opens TLS to the real API itself"
            )
    if "#" in raw_target:
        raise BadRequest("the request target must not contain a fragment")
    # The authority ends at the first '/'. A '?' (or any other character) before it is not
    # read as the start of a query: it makes the host invalid, and the request a 400.
    authority, slash, path_query = rest.partition("/")
    path, _, query = ("/" + path_query if slash else "/").partition("?")
    if "@" in authority:
        raise BadRequest("URLs with credentials (user:password@host) are refused")
    host, port = split_authority(authority, _DEFAULT_PORTS[scheme])
    return Target(scheme, host, port, path, query)


@functools.lru_cache(maxsize=1024)
def split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` -> (validated host, port); a 400 for anything else. Memoised like
    :func:`valid_host`: an authority that validates is at most a 253-character name (or an
    IPv6 literal) and a port, and a refusal is an exception, never cached."""
    if authority.startswith("["):
        host, bracket, port_text = authority[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise BadRequest("malformed IPv6 host in the request target")
        port_text = port_text[1:]
        if "%" in host or not host.isascii():  # zone ids name an interface: not ours to pick
            raise BadRequest("malformed IPv6 host in the request target")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError as exc:
            raise BadRequest("malformed IPv6 host in the request target") from exc
    else:
        host, _, port_text = authority.partition(":")
        host = valid_host(host)
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise BadRequest("the request target has an invalid port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise BadRequest("the request target has an invalid port")
    return host, port


@functools.lru_cache(maxsize=1024)
def valid_host(text: str) -> str:
    """A host name as DNS labels (lower-case, no trailing dot) or an IPv4 dotted quad; else 400.
    The value is never echoed: it is the app's, and may be hostile. Answers are memoised (an
    app calls a handful of hosts; 1,024 entries of at most 253 characters bound the memory, and
    a refusal is an exception, which is never cached)."""
    if not text:
        raise BadRequest("the request target has no host")
    if not text.isascii():
        raise BadRequest(
            "the host is not ASCII: send an internationalised name in its IDNA A-label form "
            "(xn--...)"
        )
    host = text.lower()
    if host.endswith("."):
        host = host[:-1]  # an absolute name: the same host (only one dot is removed)
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise BadRequest(
            "the host is not a valid DNS name (letters, digits and '-' in dot-separated labels "
            "of 1-63 characters) or IP address"
        )
    if labels[-1].isdigit():
        # A name ending in a number is an IPv4 literal to resolvers and URL parsers
        # (inet_aton reads 167772161, 0x7f.1 and 010.0.0.1 as addresses): only the dotted quad.
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError as exc:
            raise BadRequest("a numeric host must be an IPv4 dotted quad (a.b.c.d)") from exc
    for label in labels:
        if label.startswith("xn--"):
            try:
                label[4:].encode("ascii").decode("punycode")
            except UnicodeError as exc:
                raise BadRequest("the host has an invalid IDNA A-label (xn--...)") from exc
        elif label[2:4] == "--":
            raise BadRequest("the host has a reserved label (two hyphens at positions 3-4)")
    return host


def is_ip_literal(host: str) -> bool:
    """For a host from :func:`valid_host` or an IPv6 literal: is it an address, not a name."""
    return ":" in host or host[-1].isdigit()


def path_problem(path: str, *, raw: bool = False) -> str | None:
    """Why a path could name another resource at the upstream than the one scoped, or None.

    Like Envoy's ``normalize_path`` with ``path_with_escaped_slashes_action: REJECT_REQUEST``:
    the path and each percent-decoded layer of it (``%252e`` is ``%2e`` is ``.``) must hold no
    dot segment (RFC 3986 §5.2.4), also not with ``;`` parameters (``..;/``: Tomcat) or made
    only of dots and spaces (Windows trims them), no encoded slash or backslash, no raw
    backslash (IIS reads it as ``/``), no encoded control character, no IIS ``%uXXXX`` escape
    and no overlong UTF-8 (``%c0%ae`` is '.' to some decoders). ``raw``: the route
    keeps paths as sent; only the literal dot segments are refused.
    """
    if raw:
        return "a '.' or '..' segment" if _DOT_SEGMENT.search(path) else None
    layer = path
    for _ in range(_DECODE_LAYERS + 1):
        if "\\" in layer:
            return "a backslash (raw or encoded)"
        for segment in layer.split("/"):
            name = segment.split(";", 1)[0]
            if name and "." in name and not name.strip(". "):
                return "a dot segment (raw, encoded, or with ';' parameters)"
        if "%" not in layer:
            return None
        if _ENCODED_SLASH.search(layer):
            return "an encoded slash or backslash (%2F, %5C)"
        if _ENCODED_CONTROL.search(layer):
            return "an encoded control character"
        if _ODD_ESCAPE.search(layer):
            return "a %u escape or an overlong UTF-8 encoding"
        decoded = unquote(layer, errors="surrogateescape")
        if decoded == layer:
            return None
        layer = decoded
    return "percent-encoding nested too deeply"


def authority_host(value: str) -> str | None:
    """The host of a Host header's ``host[:port]`` (lower-case, IPv6 without brackets), or
    None when it is not one."""
    try:
        host, _ = split_authority(value.strip(), 80)  # validated: DNS labels or an IP literal
    except BadRequest:
        return None
    return host


@dataclass(frozen=True)
class _CompiledRule:
    rule: ScopeRule
    patterns: tuple[re.Pattern[str], ...]
    specificity: tuple[int, int, int, int, int]


def _compile_glob(glob: str) -> re.Pattern[str]:
    parts = []
    for segment in glob.split("/")[1:]:
        if segment == "**":
            parts.append("(?:/[^/]*)*")
        elif segment == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + re.escape(segment))
    return re.compile("".join(parts) or "/")


def _specificity(rule: ScopeRule, index: int) -> tuple[int, int, int, int, int]:
    segments = [s for p in rule.paths for s in p.split("/")[1:]]
    literal = sum(1 for s in segments if s not in ("*", "**"))
    return (literal, -segments.count("**"), -segments.count("*"), bool(rule.methods), -index)


@dataclass(frozen=True)
class Route:
    destination: Destination
    server: AuthorizationServer | None  # None: the route's kind needs none (credential: header)
    rules: tuple[_CompiledRule, ...]
    name: str = field(init=False)  # the destination's: read on every request
    upstream: Dial | None = field(init=False)  # the configured upstream, parsed once

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.destination.name)
        object.__setattr__(self, "upstream", _configured_upstream(self.destination.upstream))

    def dial(self, target: Target) -> Dial:
        """Where to send a request for ``target``: the configured upstream, else the requested
        host (validated by :func:`parse_target`, never a name rebuilt from a string) over TLS
        on 443."""
        if self.upstream is not None:
            return self.upstream
        host = target.host
        synthesised = host != self.destination.host  # a wildcard's label: the app chose it
        return Dial("https", host, 443, None, f"[{host}]" if ":" in host else host, synthesised)

    def upstream_origin(self, target: Target) -> str:
        """scheme://host[:port] dialled for ``target`` (for display: ``explain``, the demo)."""
        return self.dial(target).text

    def _best_rule(self, method: str, path: str) -> _CompiledRule | None:
        best: _CompiledRule | None = None
        for compiled in self.rules:
            if compiled.rule.methods and method not in compiled.rule.methods:
                continue
            if not any(p.fullmatch(path) for p in compiled.patterns):
                continue
            if best is None or compiled.specificity > best.specificity:
                best = compiled
        return best

    def scopes_for(self, method: str, path: str) -> tuple[str, ...]:
        best = self._best_rule(method, path)
        if best is not None:
            return best.rule.scopes
        return self._default_scopes(method, path)

    def _default_scopes(self, method: str, path: str) -> tuple[str, ...]:
        if self.destination.default_scopes is not None:
            return self.destination.default_scopes
        raise NoScopeRule(
            f"no scope rule of route {self.name!r} matches {method} {path}, and the route has no "
            "default scopes; add a rule or a default in the config",
            route=self.name,
        )

    @property
    def prefetch_scopes(self) -> tuple[str, ...]:
        """The scopes of the token fetched at start: the default, else the first rule's."""
        if self.destination.default_scopes is not None:
            return self.destination.default_scopes
        return self.rules[0].rule.scopes if self.rules else ()

    def explain(self, method: str, path: str) -> tuple[tuple[str, ...], str]:
        """The scopes for a request and why: which rule (or the default) decided."""
        best = self._best_rule(method, path)
        if best is not None:
            index = self.rules.index(best)
            return best.rule.scopes, f"rule {index} ({self.describe_rules[index]})"
        return self._default_scopes(method, path), "no rule matches: the route's default scopes"

    @cached_property
    def describe_rules(self) -> tuple[str, ...]:
        return tuple(
            f"{','.join(sorted(c.rule.methods)) or '*'} {' '.join(c.rule.paths)} -> "
            f"{' '.join(c.rule.scopes)}"
            for c in self.rules
        )


def _configured_upstream(text: str) -> Dial | None:
    """The route's ``upstream`` (validated by the config loader: an origin, no path) as parts."""
    if not text:
        return None
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    explicit = parts.port
    return Dial(scheme, host, explicit or _DEFAULT_PORTS[scheme], explicit, parts.netloc)


def compile_route(destination: Destination, server: AuthorizationServer | None) -> Route:
    rules = tuple(
        _CompiledRule(rule, tuple(_compile_glob(p) for p in rule.paths), _specificity(rule, i))
        for i, rule in enumerate(destination.rules)
    )
    return Route(destination, server, rules)


class Resolved(NamedTuple):
    route: Route
    target: Target
    scopes: tuple[str, ...]
    strip_overrides: bool = False  # method_override: strip; the forwarder drops the headers
    method: str = ""  # the method the scopes were chosen for (honour: the overriding one)


class RoutingTable:
    """Host -> route, built once per config. Tunnel routes (CONNECT) are a table of their own."""

    def __init__(self, config: Config) -> None:
        self._exact: dict[str, Route] = {}
        self._wildcard: dict[str, Route] = {}
        self._tunnels: dict[str, Destination] = {}
        self.local_ports: dict[int, Route] = {}
        for dest in config.destinations:
            if dest.tunnel:
                self._tunnels[dest.host] = dest
                continue
            server = (
                config.authorization_servers[dest.authorization_server] if dest.has_server else None
            )
            route = compile_route(dest, server)
            if dest.host.startswith("*."):
                self._wildcard[dest.host[2:]] = route
            else:
                self._exact[dest.host] = route
            if dest.local_port is not None:
                self.local_ports[dest.local_port] = route

        self._routes = {r.name: r for r in (*self._exact.values(), *self._wildcard.values())}
        self._all_names = frozenset({*self._routes, *(d.name for d in self._tunnels.values())})

    @property
    def all_route_names(self) -> frozenset[str]:
        """Every route name, tunnel routes included (the bounded set of metric labels)."""
        return self._all_names

    @property
    def routes(self) -> Mapping[str, Route]:
        return self._routes

    def match(self, host: str) -> Route | None:
        """The route for a validated host: exact, else ``*.suffix`` for names (an IP literal
        only matches an exact route)."""
        route = self._exact.get(host)
        if route is None and "." in host and not is_ip_literal(host):
            route = self._wildcard.get(host.split(".", 1)[1])
        return route

    def resolve(
        self, method: str, raw_target: str, overrides: Sequence[tuple[str, str]] = ()
    ) -> Resolved:
        """``overrides``: the app's method-override headers (lower-case name, value), if any."""
        target = parse_target(raw_target)
        route = self.match(target.host)
        if route is None:
            if self._tunnel_match(target.host) is not None:
                raise UnknownDestination(
                    f"{target.host} is a tunnel-only route: connect with CONNECT "
                    "(an https:// URL through the proxy), not plain http://"
                )
            raise UnknownDestination(
                f"{target.host} is not a configured destination; the sidecar denies unknown "
                "destinations (add a route under 'destinations' in the config)"
            )
        if route.upstream is None and route.destination.host != target.host:
            _check_synthesised(target.host, route.name)
        return self._resolved(route, method, target, overrides)

    def resolve_local(
        self,
        local_port: int,
        method: str,
        raw_target: str,
        overrides: Sequence[tuple[str, str]] = (),
    ) -> Resolved:
        """An origin-form request on a route's own ``local_port``: any Host, that route."""
        route = self.local_ports[local_port]
        if not raw_target.startswith("/"):
            raise BadRequest(
                f"port {local_port} serves route {route.name!r} only: send origin-form "
                "requests (GET /path), not a proxy request",
                route=route.name,
            )
        path, _, query = raw_target.partition("?")
        if "#" in raw_target:
            raise BadRequest("fragments are not sent in requests", route=route.name)
        host = route.destination.host
        if host.startswith("*."):
            raise BadRequest(
                "a wildcard route cannot have a local_port: it needs a concrete host",
                route=route.name,
            )
        target = Target("http", host, 80, path, query)
        return self._resolved(route, method, target, overrides)

    def intercept_for(self, authority: str) -> tuple[Route, str, int] | None:
        """The intercepting route for a CONNECT ``host:port``, or None (then: tunnel_for)."""
        if "@" in authority or "/" in authority:
            raise BadRequest("CONNECT needs host:port")
        host, port = split_authority(authority, 0)
        route = self.match(host)
        if route is None or not route.destination.intercept:
            return None
        if port != 443:
            raise Forbidden(
                f"route {route.name!r} intercepts https:// on port 443 only, not {port}",
                route=route.name,
            )
        if route.upstream is None and route.destination.host != host:
            _check_synthesised(host, route.name)  # a wildcard: the app chose the host
        return route, host, port

    def resolve_intercepted(
        self,
        method: str,
        raw_target: str,
        authority: tuple[str, int],
        headers: list[tuple[str, str]],
        overrides: Sequence[tuple[str, str]] = (),
    ) -> Resolved:
        """A request decrypted from an intercepted ``CONNECT host:port``: the CONNECT authority
        fixes the host (RFC 9110 §7.4: a request naming another one is misdirected, 421)."""
        host, port = authority
        route = self.match(host)
        if route is None or not route.destination.intercept:
            # The config was reloaded while the connection stayed open.
            raise UnknownDestination(f"{host} is no longer an intercepting route")
        if "#" in raw_target:
            raise BadRequest("the request target must not contain a fragment", route=route.name)
        if raw_target.startswith("/"):
            path, _, query = raw_target.partition("?")
        elif raw_target[:8].lower() == "https://":
            named, slash, rest = raw_target[8:].partition("/")
            if "@" in named or split_authority(named, 443) != (host, port):
                raise Misdirected(
                    f"this TLS connection is for {host}:{port}; the request names another "
                    "authority",
                    route=route.name,
                )
            path, _, query = ("/" + rest if slash else "/").partition("?")
        else:
            raise BadRequest(
                "inside an intercepted https:// connection send origin-form requests (GET /path)",
                route=route.name,
            )
        values = [v for n, v in headers if n.lower() == "host"]
        if len(values) != 1:
            raise BadRequest("an HTTP/1.1 request needs exactly one Host header", route=route.name)
        try:
            named_host = split_authority(values[0].strip(), port)
        except BadRequest as exc:
            raise BadRequest("malformed Host header", route=route.name) from exc
        if named_host != (host, port):
            raise Misdirected(
                f"this TLS connection is for {host}; the Host header names another host "
                "(one host per CONNECT)",
                route=route.name,
            )
        target = Target("https", host, port, path, query)
        return self._resolved(route, method, target, overrides)

    def resolve_captured(
        self,
        method: str,
        raw_target: str,
        headers: list[tuple[str, str]],
        host: str,
        overrides: Sequence[tuple[str, str]] = (),
    ) -> Resolved:
        """A request on a transparently captured connection: origin-form, routed as
        ``http://<Host><path>``. The connection was decided for ``host`` (its first request's
        Host): a request naming another host on it is refused, never routed elsewhere."""
        route = self.match(host)
        if route is None:  # the config was reloaded while the connection stayed open
            raise UnknownDestination(f"{host} is no longer a configured destination")
        if not raw_target.startswith("/"):
            raise BadRequest(
                "a captured connection carries origin-form requests (GET /path)", route=route.name
            )
        if "#" in raw_target:
            raise BadRequest("the request target must not contain a fragment", route=route.name)
        values = [v for n, v in headers if n.lower() == "host"]
        named = authority_host(values[0]) if len(values) == 1 else None
        if named != host:
            raise BadRequest(
                f"this captured connection is for {host}; a request needs exactly one Host "
                "header naming it",
                route=route.name,
            )
        path, _, query = raw_target.partition("?")
        _, port = split_authority(values[0].strip(), 80)
        return self._resolved(route, method, Target("http", host, port, path, query), overrides)

    def tunnel_match(self, host: str) -> Destination | None:
        """The tunnel route for ``host``, if any."""
        return self._tunnel_match(host)

    def tunnel_for(self, authority: str) -> tuple[Destination, str, int]:
        """The tunnel route for a CONNECT ``host:port``, or a 403 that says why not."""
        if "@" in authority or "/" in authority:
            raise BadRequest("CONNECT needs host:port")
        host, port = split_authority(authority, 0)
        if port == 0:
            raise BadRequest("CONNECT needs host:port")
        dest = self._tunnel_match(host)
        if dest is not None and dest.host != host:
            _check_synthesised(host, dest.name)
        if dest is None:
            routed = (
                " (it is routed for plain http:// requests; set 'intercept: true' on the route "
                "for https://)"
                if self.match(host)
                else ""
            )
            raise UnknownDestination(
                f"no tunnel route for {host}{routed}; CONNECT is only allowed to hosts "
                "marked 'tunnel: true' in the config"
            )
        if port not in dest.tunnel_ports:
            allowed = ", ".join(map(str, dest.tunnel_ports))
            raise Forbidden(
                f"tunnel route {dest.name!r} allows ports {allowed}, not {port}", route=dest.name
            )
        return dest, host, port

    def _tunnel_match(self, host: str) -> Destination | None:
        dest = self._tunnels.get(host)
        if dest is None and "." in host and not is_ip_literal(host):
            dest = self._tunnels.get("*." + host.split(".", 1)[1])
        return dest

    def _resolved(
        self,
        route: Route,
        method: str,
        target: Target,
        overrides: Sequence[tuple[str, str]],
    ) -> Resolved:
        path = target.path
        dest = route.destination
        # The usual path has none of '.', '%', '\\', ';': then there is nothing to check
        # (four substring scans in C; a set's isdisjoint would make a string per character).
        if "." in path or "%" in path or "\\" in path or ";" in path:
            problem = path_problem(path, raw=dest.raw_paths)
            if problem is not None:
                raise BadRequest(
                    f"the path has {problem}: the upstream could read it as another resource "
                    "than the one the scopes were chosen for, so it is refused",
                    route=route.name,
                )
        strip = False
        query = target.query
        if overrides or (query and _METHOD_PARAM.search(_decoded_query(query))):
            method, target, strip = _method_override(route, method, target, overrides)
        return Resolved(route, target, route.scopes_for(method, path), strip, method)


def tunnel_lookup_name(dest: Destination, host: str) -> str:
    """The name a tunnel resolves for a CONNECT host: absolute (no resolv.conf search list)
    when a wildcard route let the app choose it, as :meth:`Route.dial` does for requests."""
    if host == dest.host or is_ip_literal(host):
        return host
    return f"{host}."


def _check_synthesised(host: str, route: str) -> None:
    """A wildcard route dials the requested host itself: it must be a name, and its own label
    must not be numeric (``167772161.wild.test`` is an address to some resolvers)."""
    if is_ip_literal(host) or host.split(".", 1)[0].isdigit():
        raise BadRequest(
            "a wildcard route dials the requested host: it must be a DNS name whose first label "
            "is not a number",
            route=route,
        )


def _decoded_query(query: str) -> str:
    return unquote_plus(query, errors="surrogateescape") if "%" in query else query


def _query_override(query: str) -> tuple[list[str], str]:
    """The ``_method`` values in a query, and the query without them (``&`` and ``;`` both
    separate parameters: some frameworks read either)."""
    values: list[str] = []
    kept: list[str] = []
    for item in _QUERY_SEPARATOR.split(query):
        if item in ("&", ";"):
            kept.append(item)
            continue
        name, _, value = item.partition("=")
        if _METHOD_PARAM.match(_decoded_query(name)):
            values.append(_decoded_query(value))
            if kept:
                kept.pop()  # its separator goes with it
        else:
            kept.append(item)
    return values, "".join(kept).strip("&;")


def _method_override(
    route: Route, method: str, target: Target, overrides: Sequence[tuple[str, str]]
) -> tuple[str, Target, bool]:
    """Apply the route's ``method_override`` policy: (method to scope on, target, strip)."""
    policy = route.destination.method_override
    values, stripped_query = _query_override(target.query)
    names = sorted({name for name, _ in overrides} | ({"_method"} if values else set()))
    if policy == "strip":
        return method, target._replace(query=stripped_query), True
    if policy == "honour" and not any(n in OVERRIDE_URL_HEADERS for n in names):
        chosen = {v.strip().upper() for n, v in overrides if n in OVERRIDE_METHOD_HEADERS}
        chosen.update(v.strip().upper() for v in values)
        if len(chosen) == 1:
            (override,) = chosen
            if _TOKEN.fullmatch(override):
                return override, target, False
        raise BadRequest(
            f"the method override ({', '.join(names)}) must name exactly one valid method",
            route=route.name,
        )
    raise BadRequest(
        f"method or URL override refused ({', '.join(names)}): the upstream could act on another "
        "method or path than the one the scopes were chosen for (the route's method_override "
        "option can strip or honour them)",
        route=route.name,
    )
