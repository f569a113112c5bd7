"""``sidecar check`` and ``sidecar explain``: what a config will do, before it runs.

Schema problems are found by :func:`sidecar.config.parse`; :func:`check_config` adds what
needs the file system or whole-config reasoning: CA files that do not parse, unreadable secret
files, scope rules that can never be chosen, routes that shadow each other. :func:`warnings`
lists what is allowed but deserves a second look (printed by ``check`` with the summary).
"""

from __future__ import annotations

import dataclasses
import ssl
import time
from pathlib import Path
from typing import Any

from sidecar.config import SAFE_METHODS, Address, Config, Destination, cleartext_settings
from sidecar.credentials.kinds.static_header import header_value
from sidecar.routing import Resolved, RoutingTable, compile_route


def check_config(cfg: Config) -> list[str]:
    problems: list[str] = []
    for name, server in cfg.authorization_servers.items():
        where = f"authorization_servers.{name}"
        problems += _ca_problems(server.ca_file, f"{where}.ca_file")
        if server.client_secret_file is not None:
            problems += _readable(server.client_secret_file, f"{where}.client_secret_file")
    used = {d.authorization_server for d in cfg.destinations if d.has_server}
    for name in sorted(set(cfg.authorization_servers) - used):
        problems.append(f"authorization_servers.{name}: not used by any destination")
    for index, dest in enumerate(cfg.destinations):
        where = f"destinations[{index}]"
        problems += _ca_problems(dest.ca_file, f"{where}.ca_file")
        if dest.tunnel:
            continue
        for h_index, header in enumerate(dest.headers):
            problems += _header_secret(header.file, f"{where}.headers[{h_index}].file")
        if dest.local_port is not None and dest.host.startswith("*."):
            problems.append(f"{where}.local_port: a wildcard route needs a concrete host")
        seen: dict[tuple[frozenset[str], str], int] = {}
        for r_index, rule in enumerate(dest.rules):
            for path in rule.paths:
                earlier = seen.get((rule.methods, path))
                if earlier is not None:
                    problems.append(
                        f"{where}.scopes.rules[{r_index}]: never chosen: rule {earlier} has the "
                        f"same methods and path {path!r} and comes first"
                    )
                seen.setdefault((rule.methods, path), r_index)
        if dest.has_server and dest.default_scopes is None and not dest.rules:
            problems.append(
                f"{where}.scopes: no default and no rules: every request would be refused"
            )
    return problems


def warnings(cfg: Config) -> list[str]:
    """Allowed, but worth a second look: a default scope that also covers writes, cleartext."""
    found: list[str] = []
    for index, dest in enumerate(cfg.destinations):
        if dest.tunnel or dest.default_scopes is None:
            continue
        if not any(rule.methods - SAFE_METHODS for rule in dest.rules):
            found.append(
                f"destinations[{index}].scopes.default applies to every method, writes "
                "(POST, PUT, PATCH, DELETE, ...) included, and no rule names an unsafe method; "
                "add rules for the writes if they need other scopes"
            )
    found += [
        f"{where}: cleartext http:// (allow_cleartext_development_only): development only"
        for where in cleartext_settings(cfg)
    ]
    return found


def _ca_problems(path: Path | None, where: str) -> list[str]:
    if path is None:
        return []
    try:
        ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        return [f"{where}: {path} does not exist"]
    except (ssl.SSLError, OSError, ValueError) as exc:
        return [f"{where}: {path} is not a PEM CA bundle ({exc})"]
    return []


def _readable(path: Path, where: str) -> list[str]:
    try:
        if not path.read_text(encoding="utf-8").strip():
            return [f"{where}: {path} is empty"]
    except OSError as exc:
        return [f"{where}: cannot read {path} ({exc.strerror})"]
    return []


def _header_secret(path: Path, where: str) -> list[str]:
    """A static header's file: readable, and a value a header can carry (never echoed)."""
    try:
        if path.stat().st_size > 64 * 1024:
            return [f"{where}: {path} is larger than 64 KiB"]
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return [f"{where}: cannot read {path} ({exc.strerror})"]
    if header_value(text) is None:
        return [
            f"{where}: {path} is empty or holds characters a header cannot carry (line "
            "breaks inside the value, control characters, non-ASCII); content not shown"
        ]
    return []


def _credential_summary(cfg: Config, dest: Destination) -> str:
    """How a route gets its credential, for ``check`` (never a value)."""
    if dest.credential == "header":
        return "header " + ", ".join(h.name for h in dest.headers) + " (from files)"
    server = cfg.authorization_servers[dest.authorization_server]
    if server.kind == "google_sts":
        account = f", as {server.service_account}" if server.service_account else ""
        return f"via {server.name} (google_sts{account}, bearer)"
    if dest.credential == "aws_sigv4":
        return (
            f"aws_sigv4 (service {dest.aws_service}, region {dest.aws_region}) via "
            f"{server.name} (aws_sts, role {server.role_arn})"
        )
    return f"via {server.name} ({server.grant}, {server.client_auth}, {dest.token_type})"


def summary(cfg: Config) -> str:
    lines = [
        f"config OK: {cfg.source}",
        f"  listen {cfg.listen}, admin {cfg.admin}, SPIFFE socket {cfg.spiffe_socket}",
    ]
    for dest in cfg.destinations:
        if dest.tunnel:
            ports = ",".join(map(str, dest.tunnel_ports))
            lines.append(f"  route {dest.name}: CONNECT {dest.host}:{ports} (blind tunnel)")
            continue
        local = f", local port {dest.local_port}" if dest.local_port else ""
        if dest.intercept:
            local += ", https:// intercepted (pod CA)"
        lines.append(
            f"  route {dest.name}: {dest.host} -> {dest.upstream or 'https://' + dest.host} "
            f"{_credential_summary(cfg, dest)}{local}"
        )
        if not dest.has_server:
            continue
        route = compile_route(dest, cfg.authorization_servers[dest.authorization_server])
        lines += [f"    {text}" for text in route.describe_rules]
        if dest.default_scopes is not None:
            lines.append(f"    default -> {' '.join(dest.default_scopes) or '(no scope)'}")
        else:
            lines.append("    default -> (none: requests matching no rule are refused)")
    lines += [f"  warning: {text}" for text in warnings(cfg)]
    return "\n".join(lines)


def explain(cfg: Config, method: str, url: str) -> tuple[str, Resolved]:
    resolved = RoutingTable(cfg).resolve(method, url)
    route, target = resolved.route, resolved.target
    scopes, why = route.explain(method, target.path)
    server = route.server
    dest = route.destination
    lines = [
        f"{method} {url}",
        f"  route          {route.name} (host {dest.host})",
        f"  upstream       {route.upstream_origin(target)}{target.path}",
    ]
    if server is None:
        lines.append(f"  credential     {_credential_summary(cfg, dest)}")
        for header in dest.headers:
            prefix = f", prefix {header.prefix!r}" if header.prefix else ""
            lines.append(f"    {header.name:12} from {header.file}{prefix}")
        return "\n".join(lines), resolved
    if server.kind == "aws_sts":
        lines += [
            f"  credential     {_credential_summary(cfg, dest)}",
            f"  from           {server.name}: AssumeRoleWithWebIdentity at {server.token_endpoint}",
            f"  role           {server.role_arn}, {server.duration} s",
            "  session name   "
            + (server.session_name or "derived from the SPIFFE ID ([\\w+=,.@-]{2,64})"),
            f"  web identity   the JWT-SVID for audience {server.jwt_svid_audience}",
        ]
        return "\n".join(lines), resolved
    if server.kind == "google_sts":
        account = server.service_account
        lines += [
            f"  scopes         {' '.join(scopes) or '(none)'}",
            f"  because        {why}",
            f"  token          bearer, from {server.name}: Google workload identity federation",
            f"  provider       {server.provider} (JWT-SVID audience {server.jwt_svid_audience})",
            f"  impersonates   {account}, {server.duration} s" if account else "  impersonates   -",
        ]
        return "\n".join(lines), resolved
    lines += [
        f"  scopes         {' '.join(scopes) or '(none)'}",
        f"  because        {why}",
        f"  token          {dest.token_type}, resource={dest.resource} audience={dest.audience}",
        f"  from           {server.name}: grant {server.grant}, client auth {server.client_auth}, "
        f"{server.issuer or server.token_endpoint}",
    ]
    if server.request_encoding != "form" or server.extra_fields:
        fields = ", ".join(f"{k}={v}" for k, v in server.extra_fields) or "-"
        lines.append(f"  request        {server.request_encoding}, vendor fields {fields}")
    return "\n".join(lines), resolved


async def fetch_and_describe(cfg: Config, resolved: Resolved) -> str:
    """Get the token this request would use; describe it without revealing it."""
    from sidecar.runtime import Sidecar

    # A private sidecar: ephemeral loopback port, no admin, no local ports, nothing prefetched.
    quiet = dataclasses.replace(
        cfg,
        listen=Address("127.0.0.1", 0),
        admin=None,
        prefetch=False,
        watch=False,
        destinations=tuple(dataclasses.replace(d, local_port=None) for d in cfg.destinations),
    )
    if resolved.route.server is None or resolved.route.server.kind == "aws_sts":
        async with Sidecar(quiet, grace=0.1) as sidecar:
            await sidecar.credentials.warm(resolved.route, resolved.scopes)
        return "  credential     obtained and checked (values and keys are never printed)"
    async with Sidecar(quiet, grace=0.1) as sidecar:
        key, token = await sidecar.credentials.token(resolved.route, resolved.scopes)
        claims: dict[str, Any] = dict(token.claims)
    lines = ["  token claims   (decoded, not verified; the token itself is never printed)"]
    for name in sorted(claims):
        lines.append(f"    {name:12} {claims[name]}")
    if "exp" in claims:
        lines.append(f"  expires in     {int(claims['exp'] - time.time())} s")
    lines.append(f"  token type     {token.token_type}, scope {' '.join(token.scope) or '-'}")
    lines.append(f"  cache key      server={key.server} client_id={key.client_id}")
    return "\n".join(lines)
