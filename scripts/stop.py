"""Stop the local service gracefully: drain and remove the applications, then stop Ray.

    make stop        (or: .venv/bin/python -m scripts.stop)
"""

from __future__ import annotations

import argparse
import sys

from deployments import ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for the drain")
    args = parser.parse_args(argv)
    if not ops.ray_running():
        print("no local Ray cluster is running; stopping any leftover Ray processes")
        ops.stop_ray()
        return 0
    print("removing the applications (in-flight answers finish first)...")
    try:
        ops.remove_all_apps(args.config, args.timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(f"warning: {exc}; stopping Ray anyway", file=sys.stderr)
    print("stopping Ray...")
    ops.stop_ray()
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
