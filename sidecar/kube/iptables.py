"""``sidecar iptables install|remove|show``: apply the capture rules (the I/O edge of
:mod:`sidecar.proxy.transparent.rules`).

Runs in the pod's network namespace (the init container, as root with NET_ADMIN and NET_RAW):
reads the nat table with ``iptables-save``, applies the computed script with
``iptables-restore --noflush`` (one atomic commit per family, the rest of the table untouched),
for IPv4 and, unless ``--no-ipv6``, IPv6 (skipped with a line when the pod has no IPv6).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence

from sidecar.proxy.transparent.rules import Plan, install_script, installed, remove_script, validate

FAMILIES = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
DEFAULT_PORT = 15006
DEFAULT_UID = 65532  # the image's user (Dockerfile)


class RulesError(Exception):
    pass


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "iptables",
        help="install or remove the transparent-capture rules in this network namespace",
    )
    parser.add_argument("action", choices=("install", "remove", "show"))
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="transparent listener port")
    parser.add_argument("--uid", type=int, default=DEFAULT_UID, help="the sidecar's UID (excluded)")
    parser.add_argument(
        "--exclude-uid", type=int, action="append", default=[], help="another UID left alone"
    )
    parser.add_argument(
        "--exclude-cidr", action="append", default=[], help="destination network left alone"
    )
    parser.add_argument(
        "--exclude-port", type=int, action="append", default=[], help="destination port left alone"
    )
    parser.add_argument(
        "--include-port",
        type=int,
        action="append",
        default=[],
        help="capture only these destination ports (default: every TCP port not excluded)",
    )
    parser.add_argument("--no-ipv6", action="store_true", help="IPv4 only")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the iptables-restore input, change nothing"
    )
    parser.set_defaults(func=cmd_iptables)


def plan_from(args: argparse.Namespace) -> Plan:
    return Plan(
        port=args.port,
        uid=args.uid,
        exclude_uids=tuple(args.exclude_uid),
        exclude_cidrs=tuple(args.exclude_cidr),
        exclude_ports=tuple(args.exclude_port),
        include_ports=tuple(args.include_port),
    )


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - fixed tool names, arguments we built
            list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RulesError(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise RulesError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout


def _families(no_ipv6: bool) -> list[int]:
    families = [4]
    if not no_ipv6:
        tool = shutil.which(FAMILIES[6][0])
        if tool is None:
            print("ip6tables not found: IPv6 is not captured", file=sys.stderr)
        else:
            families.append(6)
    return families


def _apply_family(action: str, plan: Plan, version: int, dry_run: bool) -> str:
    save, restore = FAMILIES[version]
    try:
        saved = _run([save, "-t", "nat"])
    except RulesError:
        if version == 6:  # a kernel or pod without IPv6 nat: nothing to capture there
            return "IPv6: no nat table here, skipped"
        raise
    if action == "show":
        return f"IPv{version}: {'installed' if installed(saved) else 'not installed'}"
    script = install_script(plan, version, saved) if action == "install" else remove_script(saved)
    if script is None:
        return f"IPv{version}: nothing to remove"
    if dry_run:
        return f"# IPv{version}\n{script}"
    _run([restore, "--noflush"], script)
    return f"IPv{version}: {'installed' if action == 'install' else 'removed'}"


def cmd_iptables(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    problems = validate(plan)
    if problems:
        for problem in problems:
            print(f"sidecar iptables: {problem}", file=sys.stderr)
        return 2
    try:
        for version in _families(args.no_ipv6):
            print(_apply_family(args.action, plan, version, args.dry_run))
    except RulesError as exc:
        print(f"sidecar iptables: {exc}", file=sys.stderr)
        return 1
    return 0
