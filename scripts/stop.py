"""Stop the local service gracefully: drain, remove the applications, then stop Ray.

    make stop        (or: .venv/bin/python -m scripts.stop)

Answers in flight finish first (unlike `serve shutdown -y` or a bare `ray stop`, which cut them).
Works as a Kubernetes preStop hook on the head pod.
"""

from __future__ import annotations

import argparse
import sys

from control import cluster, local_cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for the drain")
    args = parser.parse_args(argv)
    if not cluster.ray_running():
        print("no local Ray cluster is answering; stopping any leftover Ray processes")
        local_cluster.stop_ray()
        return 0
    try:
        local_cluster.graceful_stop(args.config, timeout_s=args.timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(f"warning: {exc}; stopping Ray anyway", file=sys.stderr)
        local_cluster.stop_ray()
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
