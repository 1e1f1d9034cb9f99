"""A real local Ray cluster with the service deployed through `serve deploy`, once per session.

The cluster belongs to this test process (`ray.init` with a dashboard on a free port), so
`ray.shutdown()` stops exactly it and nothing else running on the machine.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ingest_samples(kb_root: Path) -> None:
    from rag.config import load_serve_config, pipeline_configs
    from rag.ingest import ingest_directory

    config = next(iter(pipeline_configs(load_serve_config(REPO / "serve_config.yaml")).values()))
    ingest_directory(REPO / "data" / "sample_kb", kb_root, "samples", config)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    import ray
    from ray import serve

    from deployments import ops

    work = tmp_path_factory.mktemp("cluster")
    kb_root = work / "kb"
    ingest_samples(kb_root)
    dashboard_port, http_port = free_port(), free_port()
    config = ops.write_config(REPO / "serve_config.yaml", work / "serve_config.yaml", http_port=http_port,
                              kb_root=kb_root)
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, log_to_driver=False)
    try:
        local = LocalService(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{dashboard_port}", config, kb_root)
        ops.deploy(config, dashboard=local.dashboard)
        ops.wait_ready(local.gateway, timeout_s=300, dashboard=local.dashboard)
        yield local
    finally:
        serve.shutdown()
        ray.shutdown()
