"""The service on a real local Ray cluster, deployed as `serve deploy` does, for the cluster tests.

Each cluster belongs to the test process (`ray.init` with a dashboard on a free port), so
`ray.shutdown()` stops exactly it and nothing else running on the machine.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from control import cluster
from rag.auth import create_key_file, read_client_key
from rag.client import gateway_client
from tests.support import cluster as support

CLUSTER_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
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

    @property
    def events_file(self) -> Path:
        """Where this cluster's replicas append their lifecycle events (`RAG_LIFECYCLE_EVENTS`)."""
        return self.work / "lifecycle_events.jsonl"

    def client(self, **options: Any) -> httpx.Client:
        """An httpx client for this gateway that sends the API key."""
        return gateway_client(self.gateway, self.api_key, **options)

    def config(self, name: str, **overrides: Any) -> Path:
        """A variant of this service's config (same port and KB root) written next to it."""
        return cluster.write_config(self.config_path, self.work / name, **overrides)


def ingest_samples(kb_root: Path) -> None:
    """The bundled sample KB (version 1) under `kb_root`, as `make demo` ingests it: built once per test
    process, then copied into each cluster's own fresh KB root (a build embeds every sample again)."""
    shutil.copytree(_built_samples(), kb_root, dirs_exist_ok=True)


@functools.cache
def _built_samples() -> Path:
    from control.document import load_serve_config
    from control.serve_config import pipeline_configs
    from rag.ingest import ingest_directory

    root = Path(tempfile.mkdtemp(prefix="rag-samples-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    config = next(iter(pipeline_configs(load_serve_config(REPO / "serve_config.yaml")).values()))
    ingest_directory(REPO / "data" / "sample_kb", root, "samples", config)
    return root


@contextmanager
def running_service(work: Path, *, wait: bool = True, with_metrics: bool = False,
                    **overrides: Any) -> Iterator[LocalService]:
    """Ingest the sample KB, start a local cluster, `serve deploy` the repo's config (with `overrides`
    passed to `cluster.write_config`), optionally wait for /ready; shut everything down afterwards."""
    kb_root = work / "kb"
    ingest_samples(kb_root)
    http_port = support.free_port()
    metrics_port = support.free_port() if with_metrics else None
    key_file = work / "api_key"  # a fresh key for this cluster's gateway; the repo's var/api_key is untouched
    create_key_file(key_file)
    gateway_args = {"api_key_file": str(key_file), **overrides.pop("gateway_args", {})}
    config = cluster.write_config(REPO / "serve_config.yaml", work / "serve_config.yaml", http_port=http_port,
                                  kb_root=kb_root, gateway_args=gateway_args, **overrides)
    api_key = read_client_key(key_file)
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    # Ray's nodes, so every replica, inherit this process's environment as the cluster starts.
    events_before = os.environ.get("RAG_LIFECYCLE_EVENTS")
    os.environ["RAG_LIFECYCLE_EVENTS"] = str(work / "lifecycle_events.jsonl")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_restore_env, "RAG_LIFECYCLE_EVENTS", events_before)
        dashboard = cleanup.enter_context(support.private_cluster(**extra))
        local = LocalService(f"http://127.0.0.1:{http_port}", dashboard, config, kb_root,
                             work, f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None, api_key)
        cluster.deploy(config, dashboard=local.dashboard)
        if wait:
            cluster.wait_ready(local.gateway, timeout_s=300, dashboard=local.dashboard)
        yield local


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
