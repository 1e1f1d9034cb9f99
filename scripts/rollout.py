"""Roll a new pipeline version out under load, with automatic promote or rollback.

    python -m scripts.rollout start v2 --from v1 --set retrieval.knowledge_bases.samples=2
    python -m scripts.rollout start v2            (v2's application already in serve_config.yaml)
    python -m scripts.rollout start v2 --no-shadow   (no shadow stage: judged on live requests only)
    python -m scripts.rollout start v2 --from v1 --set generation.backend=openai ... --judge ttft_slack_s=2
                                                     (this rollout's own judging settings)
    python -m scripts.rollout status
    python -m scripts.rollout abort
    python -m scripts.rollout start v2 --resume   (continue an interrupted or held rollout)
    python -m scripts.rollout --dry-run start v2 --from v1 ...   (plan and preflight only)

Before changing anything, `start` checks that the new version fits in what the cluster has free (plus
room for a replacement's surge replicas) and refuses in seconds when it does not. Any failure rolls
back by itself. Steps, interval, thresholds and deadlines come from the gateway's `rollout` settings.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from control import cluster
from control.document import ServeDocument
from control.rollout import Rollout
from rag.client import client_key
from rag.errors import RagError
from scripts.ingest import setting


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--dashboard", default=cluster.DASHBOARD)
    parser.add_argument("--gateway", default=cluster.GATEWAY)
    parser.add_argument("--api-key-file", default=None,
                        help="the gateway key to read /stats with (default: the gateway's api_key_file)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the config it would add and whether it fits; change nothing")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="roll a version out")
    start.add_argument("version")
    start.add_argument("--from", dest="copy_of", help="derive the new version from this one")
    start.add_argument("--set", dest="settings", action="append", type=setting, default=[],
                       help="override a pipeline setting of the new version (dotted key=value)")
    start.add_argument("--resume", action="store_true")
    start.add_argument("--judge", dest="judge", action="append", type=setting, default=[],
                       help="this rollout's own gateway `rollout` setting (dotted key=value), e.g. ttft_slack_s=2 "
                            "for a switch to a slower backend")
    start.add_argument("--no-shadow", dest="shadow", action="store_false", default=None,
                       help="no shadow stage and no copies during the steps (rollout.shadow.enabled)")
    commands.add_parser("status", help="where a rollout stands")
    commands.add_parser("abort", help="send all traffic back to the stable version now")
    return parser.parse_args(argv)


def _cluster(args: argparse.Namespace) -> cluster.ClusterClient:
    gateway = ServeDocument.load(args.config).gateway
    unauthenticated = gateway.allow_unauthenticated and not args.api_key_file
    key = None if unauthenticated else client_key(args.api_key_file or gateway.api_key_path)
    return cluster.ClusterClient(args.dashboard, args.gateway, key)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a stopped rollout rolls back, as with Ctrl-C
    try:
        rollout = Rollout(args.config, _cluster(args), dry_run=args.dry_run)
        if args.command == "start":
            status = rollout.start(args.version, args.copy_of, dict(args.settings), resume=args.resume,
                                   shadow=args.shadow, judge=dict(args.judge))
            print(f"rollout of {args.version}: {status}")
            return 0 if status in ("promoted", "dry_run") else 1
        if args.command == "abort":
            print(f"rollout: {rollout.abort()}")
            return 0
        print(json.dumps(rollout.status(), indent=2, default=str))
        return 0
    except (RagError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
