"""The capture rules: which of the pod's outbound TCP connections reach the transparent listener.

Pure functions from a :class:`Plan` (and what ``iptables-save -t nat`` shows now) to the text
``iptables-restore --noflush`` applies; ``sidecar iptables`` does the I/O (``kube/iptables.py``).
iptables (not nft) because that is what Kubernetes nodes and every peer's init container
(istio-init, kagenti's proxy-init) drive: on nf_tables nodes ``iptables`` is ``iptables-nft``,
the same rules in the same kernel tables.

Two chains of our own in the ``nat`` table, so installing twice changes nothing and removing
takes exactly what we added::

    OUTPUT           -p tcp -j SIDECAR_OUTPUT          (inserted once, first)
    SIDECAR_OUTPUT   the exclusions (RETURN), then -p tcp -j SIDECAR_REDIRECT
    SIDECAR_REDIRECT -p tcp -j REDIRECT --to-ports <transparent port>

Excluded, in this order: the sidecar's own UID (its connections to the AS, the upstreams and
for passthrough must not loop back to itself), every other UID given (Istio's 1337), loopback
(``-o lo``: the pod's own ports and its own addresses go through ``lo``), DNS on 53 (only TCP is
captured at all, so UDP DNS is never touched), and the configured CIDRs and ports. A declared
chain is flushed by ``iptables-restore --noflush`` (the rest of the table is kept): re-running
``install`` replaces our rules with the new plan.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

OUTPUT_CHAIN = "SIDECAR_OUTPUT"
REDIRECT_CHAIN = "SIDECAR_REDIRECT"
JUMP = f"-p tcp -j {OUTPUT_CHAIN}"  # the one rule we add to the built-in OUTPUT chain
DNS_PORT = 53


@dataclass(frozen=True)
class Plan:
    port: int  # the transparent listener's port
    uid: int  # the sidecar's UID: never captured
    exclude_uids: tuple[int, ...] = ()  # e.g. Istio's proxy (1337)
    exclude_cidrs: tuple[str, ...] = ()
    exclude_ports: tuple[int, ...] = ()  # destination ports left alone
    include_ports: tuple[int, ...] = ()  # empty: every TCP port not excluded


def validate(plan: Plan) -> list[str]:
    """Every problem with a plan (the CLI prints them all)."""
    problems = []
    if not 1 <= plan.port <= 65535:
        problems.append(f"--port {plan.port}: must be 1-65535")
    for uid in (plan.uid, *plan.exclude_uids):
        if uid < 0:
            problems.append(f"uid {uid}: must be >= 0")
    for port in (*plan.exclude_ports, *plan.include_ports):
        if not 1 <= port <= 65535:
            problems.append(f"port {port}: must be 1-65535")
    for cidr in plan.exclude_cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            problems.append(f"--exclude-cidr {cidr!r}: not an IPv4 or IPv6 network")
    return problems


def _family_cidrs(cidrs: tuple[str, ...], version: int) -> list[str]:
    networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    return [str(n) for n in networks if n.version == version]


def output_rules(plan: Plan, version: int) -> list[str]:
    """The rules of SIDECAR_OUTPUT for IPv4 (``version=4``) or IPv6, in order."""
    rules = [f"-A {OUTPUT_CHAIN} -m owner --uid-owner {plan.uid} -j RETURN"]
    rules += [f"-A {OUTPUT_CHAIN} -m owner --uid-owner {u} -j RETURN" for u in plan.exclude_uids]
    loopback = "127.0.0.0/8" if version == 4 else "::1/128"
    rules.append(f"-A {OUTPUT_CHAIN} -o lo -j RETURN")
    rules.append(f"-A {OUTPUT_CHAIN} -d {loopback} -j RETURN")
    rules.append(f"-A {OUTPUT_CHAIN} -p tcp --dport {DNS_PORT} -j RETURN")
    rules += [
        f"-A {OUTPUT_CHAIN} -d {c} -j RETURN" for c in _family_cidrs(plan.exclude_cidrs, version)
    ]
    rules += [
        f"-A {OUTPUT_CHAIN} -p tcp --dport {p} -j RETURN" for p in sorted(set(plan.exclude_ports))
    ]
    if plan.include_ports:
        rules += [
            f"-A {OUTPUT_CHAIN} -p tcp --dport {p} -j {REDIRECT_CHAIN}"
            for p in sorted(set(plan.include_ports))
        ]
    else:
        rules.append(f"-A {OUTPUT_CHAIN} -p tcp -j {REDIRECT_CHAIN}")
    return rules


def _has_jump(saved: str) -> bool:
    return any(_is_jump(line) for line in saved.splitlines())


def _is_jump(line: str) -> bool:
    return line.startswith("-A OUTPUT ") and line.split()[-2:] == ["-j", OUTPUT_CHAIN]


def _chains(saved: str) -> set[str]:
    return {line[1:].split()[0] for line in saved.splitlines() if line.startswith(":")}


def install_script(plan: Plan, version: int, saved: str) -> str:
    """The ``iptables-restore --noflush`` input that makes the nat table hold ``plan``;
    ``saved`` is ``iptables-save -t nat`` now (the jump is inserted only if absent)."""
    lines = [
        "*nat",
        f":{OUTPUT_CHAIN} - [0:0]",  # declared: created, or flushed if it exists
        f":{REDIRECT_CHAIN} - [0:0]",
        f"-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {plan.port}",
        *output_rules(plan, version),
    ]
    if not _has_jump(saved):
        # First in OUTPUT: before any other mesh's jump (see docs/kubernetes.md, Istio).
        lines.append(f"-I OUTPUT 1 {JUMP}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def remove_script(saved: str) -> str | None:
    """What takes our rules out of the nat table described by ``saved``; None: nothing to do."""
    chains = _chains(saved) & {OUTPUT_CHAIN, REDIRECT_CHAIN}
    jumps = [line for line in saved.splitlines() if _is_jump(line)]
    if not chains and not jumps:
        return None
    lines = ["*nat"]
    lines += ["-D" + line[2:] for line in jumps]  # the exact rule as saved
    lines += [f"-F {c}" for c in sorted(chains)]
    lines += [f"-X {c}" for c in sorted(chains)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def installed(saved: str) -> bool:
    """Our jump and both chains are in the nat table ``saved`` shows."""
    return _has_jump(saved) and {OUTPUT_CHAIN, REDIRECT_CHAIN} <= _chains(saved)
