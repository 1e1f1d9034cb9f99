"""Real local Ray clusters with the service deployed through `serve deploy`.

Each cluster belongs to the test process (`ray.init` with a dashboard on a free port), so
`ray.shutdown()` stops exactly it and nothing else running on the machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rag.auth import create_key_file, read_client_key
from rag.client import gateway_client

for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ[key] = value

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class LocalService:
    gateway: str
    dashboard: str
    config_path: Path
    kb_root: Path
    work: Path
    metrics: str | None = None
    api_key: str | None = None  # the gateway's key (`Authorization: Bearer <api_key>`)

    def client(self, **options: Any) -> httpx.Client:
        """An httpx client for this gateway that sends the API key."""
        return gateway_client(self.gateway, self.api_key, **options)

    def config(self, name: str, **overrides: Any) -> Path:
        """A variant of this service's config (same port and KB root) written next to it."""
        from deployments import ops

        return ops.write_config(self.config_path, self.work / name, **overrides)


def ingest_samples(kb_root: Path) -> None:
    from rag.config import load_serve_config, pipeline_configs
    from rag.ingest import ingest_directory

    config = next(iter(pipeline_configs(load_serve_config(REPO / "serve_config.yaml")).values()))
    ingest_directory(REPO / "data" / "sample_kb", kb_root, "samples", config)


@contextmanager
def running_service(work: Path, *, wait: bool = True, with_metrics: bool = False,
                    **overrides: Any) -> Iterator[LocalService]:
    """Ingest the sample KB, start a local cluster, `serve deploy` the repo's config (with `overrides`
    passed to `ops.write_config`), optionally wait for /ready; shut everything down afterwards."""
    import ray
    from ray import serve

    from deployments import ops

    if ray.is_initialized():
        raise RuntimeError("a Ray cluster from another fixture is still up: clusters must not overlap")
    kb_root = work / "kb"
    ingest_samples(kb_root)
    dashboard_port, http_port = ops.free_port(), ops.free_port()
    metrics_port = ops.free_port() if with_metrics else None
    config = ops.write_config(REPO / "serve_config.yaml", work / "serve_config.yaml", http_port=http_port,
                              kb_root=kb_root, **overrides)
    api_key = _point_gateway_at_a_key_file(config, work / "api_key")
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, log_to_driver=False, **extra)
    try:
        local = LocalService(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{dashboard_port}", config, kb_root,
                             work, f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None, api_key)
        ops.deploy(config, dashboard=local.dashboard)
        if wait:
            ops.wait_ready(local.gateway, timeout_s=300, dashboard=local.dashboard)
        yield local
    finally:
        serve.shutdown()
        ray.shutdown()


def _point_gateway_at_a_key_file(config: Path, key_file: Path) -> str:
    """A fresh key for this cluster's gateway, in a file of its own (the repo's var/api_key is untouched)."""
    import yaml

    from rag.config import GATEWAY_BUILDER, is_app

    create_key_file(key_file)
    document = yaml.safe_load(config.read_text(encoding="utf-8"))
    for app in document["applications"]:
        if is_app(app, GATEWAY_BUILDER):
            app.setdefault("args", {})["api_key_file"] = str(key_file)
    config.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return read_client_key(key_file)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    """A cluster for one test module: modules run one after another, and one process holds one Ray."""
    with running_service(tmp_path_factory.mktemp("cluster")) as local:
        yield local
