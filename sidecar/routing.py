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
Scopes are matched against the path as sent (no percent-decoding); paths with dot-segments are
refused, so a rule cannot be side-stepped with ``/a/../b``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from sidecar.config import AuthorizationServer, Config, Destination, ScopeRule
from sidecar.errors import (
    BadRequest,
    Forbidden,
    NoScopeRule,
    NotAProxyRequest,
    UnknownDestination,
)

_DOT_SEGMENT = re.compile(r"(^|/)(\.|%2e){1,2}(/|$)", re.IGNORECASE)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Target(NamedTuple):
    """Where the app asked to go, split out of the request target. (Per request: a tuple,
    which costs a fraction of a frozen dataclass to build.)"""

    scheme: str
    host: str  # lower-case; IPv6 without brackets
    port: int
    path: str  # raw, as sent (percent-encoding kept)
    query: str  # raw, without '?'; '' when absent


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
    authority, slash, path_query = rest.partition("/")
    path, _, query = ("/" + path_query if slash else "/").partition("?")
    if "#" in raw_target:
        raise BadRequest("the request target must not contain a fragment")
    if "@" in authority:
        raise BadRequest("URLs with credentials (user:password@host) are refused")
    host, port = _split_authority(authority, _DEFAULT_PORTS[scheme])
    return Target(scheme, host, port, path, query)


def _split_authority(authority: str, default_port: int) -> tuple[str, int]:
    if authority.startswith("["):
        host, bracket, port_text = authority[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise BadRequest("malformed IPv6 host in the request target")
        port_text = port_text[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise BadRequest("malformed IPv6 host in the request target") from exc
    else:
        host, _, port_text = authority.partition(":")
    if not host:
        raise BadRequest("the request target has no host")
    if not port_text:
        return host.lower().rstrip("."), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadRequest("the request target has an invalid port")
    return host.lower().rstrip("."), int(port_text)


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
    server: AuthorizationServer
    rules: tuple[_CompiledRule, ...]
    name: str = field(init=False)  # the destination's: read on every request

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.destination.name)

    def upstream_origin(self, target: Target) -> str:
        """scheme://host[:port] to dial; without ``upstream``, the requested host over TLS."""
        if self.destination.upstream:
            return self.destination.upstream
        host = f"[{target.host}]" if ":" in target.host else target.host
        return f"https://{host}"

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


def compile_route(destination: Destination, server: AuthorizationServer) -> Route:
    rules = tuple(
        _CompiledRule(rule, tuple(_compile_glob(p) for p in rule.paths), _specificity(rule, i))
        for i, rule in enumerate(destination.rules)
    )
    return Route(destination, server, rules)


class Resolved(NamedTuple):
    route: Route
    target: Target
    scopes: tuple[str, ...]


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
            route = compile_route(dest, config.authorization_servers[dest.authorization_server])
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
        route = self._exact.get(host)
        if route is None and "." in host:
            route = self._wildcard.get(host.split(".", 1)[1])
        return route

    def resolve(self, method: str, raw_target: str) -> Resolved:
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
        return self._resolved(route, method, target)

    def resolve_local(self, local_port: int, method: str, raw_target: str) -> Resolved:
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
        return self._resolved(route, method, target)

    def tunnel_for(self, authority: str) -> tuple[Destination, str, int]:
        """The tunnel route for a CONNECT ``host:port``, or a 403 that says why not."""
        host, port = _split_authority(authority, 0)
        if port == 0:
            raise BadRequest("CONNECT needs host:port")
        dest = self._tunnel_match(host)
        if dest is None:
            routed = " (it is routed for plain http:// requests)" if self.match(host) else ""
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
        if dest is None and "." in host:
            dest = self._tunnels.get("*." + host.split(".", 1)[1])
        return dest

    def _resolved(self, route: Route, method: str, target: Target) -> Resolved:
        path = target.path
        if ("." in path or "%" in path) and _DOT_SEGMENT.search(path):
            raise BadRequest("paths with '.' or '..' segments are refused", route=route.name)
        return Resolved(route, target, route.scopes_for(method, target.path))
