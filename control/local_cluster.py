"""A local Ray cluster for `make demo` and `make stop`: start a head with token auth and the dashboard on
127.0.0.1, and stop without cutting an answer."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from control.cluster import (
    DASHBOARD,
    GATEWAY,
    deploy,
    ray_running,
    ray_token_path,
    remove_all_apps,
    run_cli,
    wait_drained,
    wait_until,
    write_config,
)

METRICS_PORT = 8080  # Prometheus scrapes http://127.0.0.1:8080/metrics
# The documented demo machine has 2 cores and `make demo` gives Ray all of them: tests and benchmarks
# run on that shape, so a reservation that cannot be scheduled there fails here first.
DEMO_CPUS = 2


def ensure_ray_token() -> Path:
    """Create the cluster token (as `ray get-auth-token --generate` does, readable by its owner only)
    unless one exists; the token itself is never printed."""
    path = ray_token_path()
    if not os.environ.get("RAY_AUTH_TOKEN") and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path


def start_head(num_cpus: int | None = None) -> bool:
    """Start a local Ray head with the dashboard on 127.0.0.1, unless one runs; True if started."""
    if ray_running():
        return False
    ensure_ray_token()
    args = ["ray", "start", "--head", "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
            "--metrics-export-port", str(METRICS_PORT)]
    if num_cpus:
        args += ["--num-cpus", str(num_cpus)]
    run_cli(*args)
    wait_until(ray_running, 60, "the Ray dashboard to answer")
    return True


def graceful_stop(config_path: str | Path, *, dashboard: str = DASHBOARD, gateway: str = GATEWAY,
                  timeout_s: float = 180, stop_cluster: bool = True, say: Any = print) -> None:
    """Stop without cutting an answer: flip /ready to draining and refuse new work (a weights-only
    update, so no replica restarts), wait for in-flight answers, remove the applications through a
    declarative deploy (Serve drains each replica), then stop Ray. Usable as a Kubernetes preStop hook."""
    with tempfile.TemporaryDirectory() as tmp:
        draining = write_config(config_path, Path(tmp) / "draining.yaml", traffic={"draining": True})
        say("draining: /ready now answers 503 draining and new requests are refused")
        deploy(draining, dashboard)
        time.sleep(1.0)  # reconfigure is applied asynchronously; let it land before counting
        left = wait_drained(gateway, timeout_s)
        say("in-flight answers finished" if left == 0 else f"timed out with {left} answers in flight")
        say("removing the applications")
        remove_all_apps(draining, timeout_s, dashboard)
    if stop_cluster:
        say("stopping Ray")
        stop_ray()


def stop_ray() -> None:
    run_cli("ray", "stop", check=False, timeout=120)
