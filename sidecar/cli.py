"""Command line: ``sidecar run | demo | check | explain | ca`` (``inject`` / ``webhook``:
Kubernetes)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from sidecar import __version__, config
from sidecar.errors import ConfigError, ProxyError
from sidecar.ops import logs

T = TypeVar("T")

log = logging.getLogger("sidecar")


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", help=f"config file (default: ${config.ENV_CONFIG})", default=None
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Trade the pod's SPIFFE identity for DPoP-bound OAuth tokens and inject them "
        "into the legacy app's outbound HTTP requests.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the sidecar")
    _config_arg(run)
    run.add_argument(
        "--grace",
        type=float,
        default=20.0,
        help="seconds to finish in-flight requests on SIGTERM (default 20)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the proxy ports with SO_REUSEPORT (default 1), behind "
        "one admin port; each keeps its own token cache, so the AS sees up to N times the "
        "token requests",
    )
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    # A worker writes its admin address here once it serves (the supervisor fans out to it).
    run.add_argument("--report-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="run the sidecar end to end on the embedded dev stack")
    demo.add_argument(
        "--serve",
        action="store_true",
        help="keep the stack up and print commands to try it by hand",
    )
    demo.set_defaults(func=cmd_demo)

    check = sub.add_parser("check", help="validate a config file and summarise its routes")
    _config_arg(check)
    check.set_defaults(func=cmd_check)

    explain = sub.add_parser(
        "explain",
        help="show which route a URL takes, the scopes it asks for and why",
    )
    _config_arg(explain)
    explain.add_argument("url", help="the plain http:// URL the app would call")
    explain.add_argument("--method", "-X", default="GET", help="HTTP method (default GET)")
    explain.add_argument(
        "--fetch",
        action="store_true",
        help="also get the token and print its decoded claims and expiry (never the token)",
    )
    explain.set_defaults(func=cmd_explain)

    ca = sub.add_parser(
        "ca",
        help="print (or write) the pod CA that apps calling https:// must trust",
    )
    _config_arg(ca)
    ca.add_argument(
        "--out",
        default=None,
        help="write ca.pem, ca-bundle.pem (with the system CAs) and truststore.p12 (PKCS#12, "
        "for the JVM) to this directory instead of printing ca.pem",
    )
    ca.add_argument(
        "--bundle", action="store_true", help="print the bundle (system CAs + the pod CA)"
    )
    ca.set_defaults(func=cmd_ca)

    from sidecar.kube.commands import register

    register(sub)  # inject, webhook
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's C core writes its own plain-text lines to stderr (INFO "Got goaway" when the SPIRE
    # agent restarts): they would break the JSON log stream. Errors only, unless ops say otherwise.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


def _load(path: str | None) -> config.Config | None:
    """The validated config, or None after printing every problem to stderr."""
    try:
        return config.load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _on_uvloop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (the stdlib loop otherwise), without
    touching the process's event loop policy: a caller in the same process (the test suite,
    an embedding program) keeps the loop it chose for what it runs next."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    logs.configure(cfg.log_level, cfg.log_format, audit=cfg.audit)
    if args.workers > 1 and not args.worker:
        return _supervise(args, cfg)
    return _on_uvloop(_serve(cfg, args.grace, reuse_port=args.worker, report_fd=args.report_fd))


def _supervise(args: argparse.Namespace, cfg: config.Config) -> int:
    """Start ``--workers`` processes on the same ports behind one admin port."""
    from sidecar.ops.supervisor import supervise, worker_command

    if cfg.listen.port == 0:
        log.error("--workers needs a fixed proxy port: port 0 would give each worker its own")
        return 2
    command = worker_command(args.config, args.grace)
    return asyncio.run(supervise(command, args.workers, cfg.admin))


async def _serve(
    cfg: config.Config, grace: float, *, reuse_port: bool = False, report_fd: int | None = None
) -> int:
    from sidecar.ops.tracing import TracingError
    from sidecar.runtime import Sidecar

    sidecar = Sidecar(cfg, grace=grace, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def on_sighup() -> None:
        task = loop.create_task(sidecar.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        await sidecar.start()
    except OSError as exc:
        log.error("cannot start: is another process using the port?", extra={"error": str(exc)})
        return 1
    except ConfigError as exc:  # what only start can check: the pod CA (intercept)
        for problem in exc.problems:
            log.error("cannot start", extra={"problem": problem})
        return 2
    except TracingError as exc:  # OTEL_* asks for what cannot run: say so, do not run untraced
        log.error("cannot start: tracing", extra={"error": str(exc)})
        return 2
    if report_fd is not None:  # a worker: tell the supervisor where its admin endpoint is
        with contextlib.suppress(OSError):
            os.write(report_fd, f"{sidecar.admin_address}\n".encode())
        with contextlib.suppress(OSError):
            os.close(report_fd)
    await stop.wait()
    log.info("signal received: draining in-flight requests, then exiting")
    await sidecar.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.devstack.demo import run_demo

    code: int = _on_uvloop(run_demo(serve=args.serve))
    return code


def cmd_check(args: argparse.Namespace) -> int:
    from sidecar.ops.checks import check_config, summary

    cfg = _load(args.config)
    if cfg is None:
        return 1
    problems = check_config(cfg)
    if problems:
        print(f"{cfg.source}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(summary(cfg))
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sidecar.proxy.intercept.ca import EXPORT_BUNDLE, EXPORT_CA, CAError, load_or_create

    cfg = _load(args.config)
    if cfg is None:
        return 1
    settings = cfg.intercept
    if not cfg.intercept_hosts:
        print("sidecar ca: no route sets 'intercept: true': there is no pod CA", file=sys.stderr)
        return 1
    if settings.ca_dir is None and settings.ca_from is None:
        print(
            "sidecar ca: intercept.ca_dir is not set, so the running sidecar's CA exists only in "
            "its memory; set ca_dir (or read intercept.export_dir)",
            file=sys.stderr,
        )
        return 1
    try:
        # The same CA the sidecar uses: kept in ca_dir (made there now if none is yet).
        ca, _ = load_or_create(
            cfg.intercept_hosts, ca_dir=settings.ca_dir, provided=settings.ca_from
        )
        if args.out:
            ca.export(Path(args.out))
            print(f"wrote {', '.join(sorted(ca.exports()))} to {args.out}")
        else:
            sys.stdout.write(ca.exports()[EXPORT_BUNDLE if args.bundle else EXPORT_CA].decode())
    except (CAError, OSError) as exc:
        print(f"sidecar ca: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from sidecar.ops.checks import explain, fetch_and_describe

    cfg = _load(args.config)
    if cfg is None:
        return 1
    try:
        text, resolved = explain(cfg, args.method.upper(), args.url)
    except ProxyError as exc:
        print(f"refused: HTTP {exc.status} {exc.code}: {exc.detail}")
        return 1
    print(text)
    if args.fetch:
        try:
            print(_on_uvloop(fetch_and_describe(cfg, resolved)))
        except ProxyError as exc:
            print(f"token request failed: {exc.code}: {exc.detail}", file=sys.stderr)
            return 1
    return 0
