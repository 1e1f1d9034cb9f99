"""The cluster client: Ray's CLI and dashboard REST API, and the gateway's probes, for the demo, the
stop script, the rollout driver and the cluster tests, so what the README tells a person to run is what
the tests exercise. No Ray import: it reaches a cluster over HTTP and through the CLI only.

Ray's token auth stays on: every CLI runs with `RAY_AUTH_MODE=token` and every dashboard call carries
the cluster's token, read from where Ray itself reads it (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, or
`~/.ray/auth_token`). With auth disabled, Ray's GCS, client server and job agent listen beyond loopback
and run whatever anyone sends them (CVE-2023-48022).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from control.document import ServeDocument, load_serve_config
from control.evaluation import evaluate
from control.serve_config import GATEWAY_BUILDER, check_serve_config, is_app
from rag.golden import GoldenItem

DASHBOARD = "http://127.0.0.1:8265"
GATEWAY = "http://127.0.0.1:8000"


def ray_token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ray_auth_headers() -> dict[str, str]:
    """The header every dashboard REST call carries (what Ray's own CLI sends)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = ray_token_path()
        token = path.read_text(encoding="utf-8").strip() if path.exists() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def ray_env() -> dict[str, str]:
    """Environment for Ray CLIs: token auth on, no usage stats, one BLAS thread per process."""
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
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
        return httpx.get(f"{dashboard}/api/version", headers=ray_auth_headers(), timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def deploy(config_path: str | Path, dashboard: str = DASHBOARD) -> None:
    """What `serve deploy FILE` does, after checking the whole config so a bad one never reaches the
    cluster."""
    apply(load_serve_config(config_path), dashboard)


def apply(config: dict[str, Any], dashboard: str = DASHBOARD) -> None:
    """Declaratively apply a whole Serve config through the dashboard's REST API (the call behind
    `serve deploy`, without the CLI's start-up cost): applications left out are drained and removed."""
    check_serve_config(config)
    response = httpx.put(f"{dashboard}/api/serve/applications/", json=config, headers=ray_auth_headers(),
                         timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"applying the Serve config failed ({response.status_code}): {response.text}")


def applications(dashboard: str = DASHBOARD) -> dict[str, Any]:
    response = httpx.get(f"{dashboard}/api/serve/applications/", headers=ray_auth_headers(), timeout=10)
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
    """Deploy the same config with fewer applications, then none: Serve drains and removes them (unlike
    `serve shutdown`, which cuts streams in flight). The gateway goes first: its knowledge-base manager
    lets running jobs finish in its drain, which needs the pipelines' Embedders still there."""
    plain = ServeDocument.load(config_path).plain()
    gateways = {app["name"] for app in plain["applications"] if is_app(app, GATEWAY_BUILDER)}
    apply({**plain, "applications": [app for app in plain["applications"] if app["name"] not in gateways]},
          dashboard)
    wait_until(lambda: not gateways & set(_safe_apps(dashboard)), timeout_s, "the gateway to drain and stop")
    apply({**plain, "applications": []}, dashboard)
    wait_until(lambda: not _safe_apps(dashboard), timeout_s, "the applications to drain and stop")


def write_config(source: str | Path, target: str | Path, **changes: Any) -> Path:
    """A copy of a Serve config with the changes `ServeDocument.variant` takes (port, KB root, ...)."""
    ServeDocument.load(source).variant(**changes).save(target)
    return Path(target)


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


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise TimeoutError(f"gave up after {timeout_s}s waiting for {what}")


class StatsUnavailableError(RuntimeError):
    """The gateway's statistics could not be read: a rollout must not judge, let alone promote, on them."""


class ClusterClient:
    """What the rollout driver needs from a running cluster, over the dashboard's REST API and the
    gateway's HTTP routes (a fake with the same methods stands in for it in unit tests)."""

    def __init__(self, dashboard: str = DASHBOARD, gateway: str = GATEWAY, api_key: str | None = None) -> None:
        self.dashboard, self.gateway = dashboard, gateway
        self._api_key = api_key
        self._gateway_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def apply(self, config: dict[str, Any]) -> None:
        apply(config, self.dashboard)

    def applications(self) -> dict[str, Any]:
        return applications(self.dashboard)

    def resource_usage(self) -> dict[str, dict[str, list[float]]]:
        """Per node and resource [used, total], as Ray's monitor reports it every few seconds."""
        response = httpx.get(f"{self.dashboard}/api/cluster_status", headers=ray_auth_headers(), timeout=10)
        response.raise_for_status()
        status = (response.json().get("data") or {}).get("clusterStatus") or {}
        usage = (status.get("loadMetricsReport") or {}).get("usageByNode")
        if not usage:
            raise RuntimeError("the cluster does not report its resource usage yet; try again in a few seconds")
        return dict(usage)

    def serving(self) -> set[str]:
        """Versions the gateway routes to now; empty when it cannot be asked."""
        return set(readiness(self.gateway)[1].get("serving") or [])

    def scaled_to_zero(self) -> dict[str, list[str]]:
        """Per version, its stages at zero replicas by design (routable: a request wakes them)."""
        return dict(readiness(self.gateway)[1].get("scaled_to_zero") or {})

    def stats(self, window_s: float | None) -> dict[str, Any]:
        """Per-version outcomes over every gateway replica; raises StatsUnavailableError otherwise."""
        params = {"window_s": window_s} if window_s else {}
        try:
            response = httpx.get(f"{self.gateway}/stats", params=params, headers=self._gateway_headers, timeout=10)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise StatsUnavailableError(f"reading {self.gateway}/stats failed: {exc}") from exc
        if response.status_code != 200 or not isinstance(body.get("versions"), dict):
            raise StatsUnavailableError(f"{self.gateway}/stats answered {response.status_code}")
        if body.get("scope", "cluster") != "cluster":
            raise StatsUnavailableError("the gateway reports one replica's numbers, not the cluster's")
        return body["versions"]

    def evaluate(self, version: str, kb: str, items: list[GoldenItem]) -> dict[str, Any]:
        """The golden set's scores for one version, through the gateway (not counted as user traffic)."""
        return evaluate(self.gateway, self._api_key, kb, items, version)
