"""``sidecar inject``, ``sidecar webhook`` and ``sidecar iptables``: the command-line edges of
:mod:`sidecar.kube`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from sidecar.kube.inject import ANNOTATIONS, DEFAULTS, IMAGE, PREFIX, InjectError, Options


def register(sub: Any) -> None:
    """Add the Kubernetes subcommands to the CLI's subparsers."""
    annotations = "\n".join(f"  {PREFIX}{k}: {v}" for k, v in ANNOTATIONS.items())
    inject = sub.add_parser(
        "inject",
        help="add the sidecar to Kubernetes workloads in YAML (Pod, Deployment, ...)",
        description="Read multi-document YAML, add the sidecar to every Pod, Deployment, "
        "StatefulSet, DaemonSet, ReplicaSet, Job and CronJob, and write the YAML to stdout. "
        "Other documents pass through. Running it twice changes nothing.",
        epilog=f"per-workload annotations (pod template or workload):\n{annotations}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inject.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    _option_args(inject)
    inject.set_defaults(func=cmd_inject)

    webhook = sub.add_parser(
        "webhook",
        help="run the mutating admission webhook (HTTPS, AdmissionReview v1)",
        description="Serve POST /mutate: the same mutation as `sidecar inject`, as a JSONPatch.",
    )
    webhook.add_argument(
        "--listen", default="0.0.0.0:8443", help="host:port (default 0.0.0.0:8443)"
    )
    webhook.add_argument("--tls-cert", required=True, type=Path, help="server certificate (PEM)")
    webhook.add_argument("--tls-key", required=True, type=Path, help="its private key (PEM)")
    _option_args(webhook)
    webhook.set_defaults(func=cmd_webhook)

    from sidecar.kube.iptables import add_parser as add_iptables

    add_iptables(sub)  # transparent capture's rules


def _option_args(parser: argparse.ArgumentParser) -> None:
    defaults = DEFAULTS
    parser.add_argument("--image", default=IMAGE, help=f"sidecar image (default {IMAGE})")
    parser.add_argument(
        "--config-map",
        default=defaults.config_map,
        help=f"ConfigMap with sidecar.yaml (default {defaults.config_map})",
    )
    parser.add_argument(
        "--intercept",
        action="store_true",
        help="give every injected app HTTPS_PROXY and the pod CA (TLS interception; the "
        f"annotation {PREFIX}intercept sets it per workload)",
    )
    parser.add_argument(
        "--transparent",
        action="store_true",
        help="capture outbound TCP with iptables (an init container with NET_ADMIN, NET_RAW) "
        "for apps that ignore HTTP_PROXY; per workload: the transparent annotation",
    )


def _options(args: argparse.Namespace) -> Options | None:
    try:
        chosen = {
            f"{PREFIX}image": args.image,
            f"{PREFIX}config-map": args.config_map,
            f"{PREFIX}intercept": str(bool(args.intercept)).lower(),
        }
        if args.transparent:
            chosen[f"{PREFIX}transparent"] = "true"
        return DEFAULTS.with_annotations(chosen)
    except InjectError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return None


def cmd_inject(args: argparse.Namespace) -> int:
    import yaml

    from sidecar.config import yaml_problem
    from sidecar.kube.inject import inject_documents

    options = _options(args)
    if options is None:
        return 2
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            text = Path(args.filename).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"sidecar inject: cannot read {args.filename}: {exc}", file=sys.stderr)
        return 2
    try:
        documents = list(yaml.safe_load_all(text))
        injected = inject_documents(documents, options)
        out = yaml.safe_dump_all(injected, sort_keys=False, explicit_start=True)
    except yaml.YAMLError as exc:
        print(f"sidecar inject: {args.filename}:{yaml_problem(exc)}", file=sys.stderr)
        return 2
    except InjectError as exc:
        print(f"sidecar inject: {args.filename}: {exc}", file=sys.stderr)
        return 2
    except RecursionError:
        print(f"sidecar inject: {args.filename}: nested too deeply", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OverflowError) as exc:  # PyYAML constructors (bad dates)
        print(
            f"sidecar inject: {args.filename}: not usable ({type(exc).__name__})", file=sys.stderr
        )
        return 2
    sys.stdout.write(out)
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    from sidecar.kube.webhook import ReloadingCertificate, WebhookServer
    from sidecar.ops import logs

    options = _options(args)
    if options is None:
        return 2
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit():
        print(f"sidecar webhook: --listen must be host:port, got {args.listen!r}", file=sys.stderr)
        return 2
    logs.configure("info", "json")
    try:
        certificate = ReloadingCertificate(args.tls_cert, args.tls_key)
    except (OSError, ValueError) as exc:
        print(f"sidecar webhook: cannot load the TLS certificate: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        server = WebhookServer(
            certificate,
            host=host.strip("[]") or "0.0.0.0",  # noqa: S104 - the API server calls in
            port=int(port),
            options=options,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        await stop.wait()
        await server.stop()

    asyncio.run(serve())
    return 0
