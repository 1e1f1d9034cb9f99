"""Operating a local cluster: start Ray, deploy the Serve config, wait for readiness, stop gracefully.

The demo, the stop script and the cluster tests all go through these, so what the README tells a
person to run is what the tests exercise.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from rag.config import PIPELINE_BUILDER, check_serve_config, is_app, load_serve_config

DASHBOARD = "http://127.0.0.1:8265"
GATEWAY = "http://127.0.0.1:8000"
METRICS_PORT = 8080  # Prometheus scrapes http://127.0.0.1:8080/metrics


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for private clusters in tests and benchmarks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ray_env() -> dict[str, str]:
    """Environment for Ray CLIs: no token auth on the local cluster (Ray 2.60 turns it on by default,
    after which `serve deploy` is refused), no usage stats, one BLAS thread per process."""
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def run_cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_bin(args[0]), *args[1:]], env=ray_env(), check=check, text=True,
                          capture_output=True, timeout=timeout)


def ray_running(dashboard: str = DASHBOARD) -> bool:
    try:
        return httpx.get(f"{dashboard}/api/version", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_head(num_cpus: int | None = None) -> bool:
    """Start a local Ray head with the dashboard on 127.0.0.1, unless one runs; True if started."""
    if ray_running():
        return False
    args = ["ray", "start", "--head", "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
            "--metrics-export-port", str(METRICS_PORT)]
    if num_cpus:
        args += ["--num-cpus", str(num_cpus)]
    run_cli(*args)
    _wait(ray_running, 60, "the Ray dashboard to answer")
    return True


def deploy(config_path: str | Path, dashboard: str = DASHBOARD) -> None:
    """What `serve deploy FILE` does, after checking the whole config so a bad one never reaches the
    cluster."""
    apply(load_serve_config(config_path), dashboard)


def apply(config: dict[str, Any], dashboard: str = DASHBOARD) -> None:
    """Declaratively apply a whole Serve config through the dashboard's REST API (the call behind
    `serve deploy`, without the CLI's start-up cost): applications left out are drained and removed."""
    check_serve_config(config)
    response = httpx.put(f"{dashboard}/api/serve/applications/", json=config, timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"applying the Serve config failed ({response.status_code}): {response.text}")


def applications(dashboard: str = DASHBOARD) -> dict[str, Any]:
    response = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10)
    response.raise_for_status()
    return response.json().get("applications", {})


def readiness(base_url: str = GATEWAY) -> tuple[int, dict[str, Any]]:
    try:
        response = httpx.get(f"{base_url}/ready", timeout=5)
        return response.status_code, response.json()
    except (httpx.HTTPError, ValueError) as exc:
        return 0, {"status": "unreachable", "error": str(exc)}


def wait_ready(base_url: str = GATEWAY, timeout_s: float = 600, on_poll: Any = None,
               dashboard: str = DASHBOARD) -> dict[str, Any]:
    """Poll `/ready` until 200; raise with the last answer and any failed application on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = readiness(base_url)
        if status == 200:
            return body
        if on_poll:
            on_poll(status, body)
        failed = {n: a.get("message") for n, a in _safe_apps(dashboard).items()
                  if a.get("status") == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"deployment failed: {failed}")
        time.sleep(1)
    raise TimeoutError(f"{base_url}/ready still not 200 after {timeout_s}s: {readiness(base_url)}")


def _safe_apps(dashboard: str = DASHBOARD) -> dict[str, Any]:
    try:
        return applications(dashboard)
    except httpx.HTTPError:
        return {}


def remove_all_apps(config_path: str | Path, timeout_s: float = 180, dashboard: str = DASHBOARD) -> None:
    """Deploy the same config with no applications: Serve drains and removes them (unlike
    `serve shutdown`, which cuts streams in flight)."""
    config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    apply({**config, "applications": []}, dashboard)
    _wait(lambda: not _safe_apps(dashboard), timeout_s, "the applications to drain and stop")


def write_config(source: str | Path, target: str | Path, *, http_port: int | None = None,
                 kb_root: str | Path | None = None, pipeline_args: dict[str, Any] | None = None,
                 traffic: dict[str, Any] | None = None,
                 deployment_options: dict[str, dict[str, Any]] | None = None) -> Path:
    """A copy of a Serve config with another HTTP port, KB root, pipeline settings, gateway traffic
    settings or per-deployment options (`{"Generator": {"ray_actor_options": ...}}`)."""
    config = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    if http_port is not None:
        config.setdefault("http_options", {})["port"] = http_port
    for app in config["applications"]:
        _patch_app(app, kb_root, pipeline_args or {}, traffic or {}, deployment_options or {})
    Path(target).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return Path(target)


def _patch_app(app: dict[str, Any], kb_root: str | Path | None, pipeline_args: dict[str, Any],
               traffic: dict[str, Any], deployment_options: dict[str, dict[str, Any]]) -> None:
    if is_app(app, PIPELINE_BUILDER):
        args = app.setdefault("args", {})
        if kb_root is not None:
            args.setdefault("retrieval", {})["kb_root"] = str(kb_root)
        for section, values in pipeline_args.items():
            args[section] = {**args.get(section, {}), **values} if isinstance(values, dict) else values
    for deployment in app.get("deployments") or []:
        deployment.update(deployment_options.get(deployment["name"], {}))
        if deployment["name"] == "Gateway" and traffic:
            deployment["user_config"] = {**(deployment.get("user_config") or {}), **traffic}


def wait_drained(base_url: str = GATEWAY, timeout_s: float = 120) -> int:
    """Wait until the gateway reports no request in flight; returns the count left (0 unless timed out)."""
    deadline = time.monotonic() + timeout_s
    left = -1
    while time.monotonic() < deadline:
        status, body = readiness(base_url)
        left = int(body.get("in_flight", 0)) if status else 0
        if left == 0:
            return 0
        time.sleep(0.5)
    return left


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


def _wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise TimeoutError(f"gave up after {timeout_s}s waiting for {what}")
