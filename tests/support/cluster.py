"""Test and benchmark support: a private Ray cluster per fixture, free ports, fault injection.

Not part of the service: what a test or a benchmark needs to own a cluster and break it on purpose.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from control.local_cluster import DEMO_CPUS, ensure_ray_token
from rag.config import EmbeddingConfig
from rag.embedding_export import ensure_export

# Ray's own processes take ports the kernel hands out (the ephemeral range) and workers take
# 10002-19999, both after our port was chosen: a port from either can be gone by the time Serve's
# proxy binds it ("Failed to bind to address"). Ours come from the gap between them.
_PORT_RANGE = (20000, 32767)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, outside the ranges Ray and the kernel hand out
    (for private clusters in tests and benchmarks)."""
    low, high = _PORT_RANGE[0], min(_PORT_RANGE[1], _ephemeral_low() - 1)
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 between {low} and {high}")


def use_token_auth() -> None:
    """This process, and the Ray nodes it starts in-process, with token auth and a token to use."""
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"})
    ensure_ray_token()


@contextmanager
def private_cluster(num_cpus: float = DEMO_CPUS, **init_args: Any) -> Iterator[str]:
    """A Ray cluster owned by this process, with token auth and a dashboard on a free 127.0.0.1 port;
    yields the dashboard's URL. Ray is shut down on exit, stopping exactly this cluster and every process
    in it: Serve's replicas go with their node. (No `serve.shutdown()` first: its graceful stop waits out
    every replica's drain loop, seconds per cluster, and a test that cares about a graceful stop makes
    one itself.)"""
    import ray

    if ray.is_initialized():
        raise RuntimeError("a Ray cluster from another fixture is still up: clusters must not overlap")
    use_token_auth()
    # As make demo does: the default model's ONNX export is made before any replica needs it.
    ensure_export(EmbeddingConfig().model, EmbeddingConfig().cache_dir)
    port = free_port()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, log_to_driver=False, **init_args)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        ray.shutdown()


def kill_replica(dashboard: str, app: str, deployment: str) -> str:
    """Kill one live replica actor of a deployment the hard way, as a crash would (Serve starts a new
    one); returns the actor's name. For fault tests and benchmarks: the caller is connected to Ray."""
    import ray
    from ray.util.state import list_actors

    alive = [a for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
             if a.class_name == f"ServeReplica:{app}:{deployment}"]
    if not alive:
        raise RuntimeError(f"no live replica of {app}/{deployment}")
    name = alive[0].name
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name
