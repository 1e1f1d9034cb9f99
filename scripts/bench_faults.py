"""Faults under load: one replica killed at a time while streaming clients keep asking.

    python -m scripts.bench_faults                       (8 clients; every stage, then a gateway replica)
    python -m scripts.bench_faults --faults Generator Embedder --clients 8
    python -m scripts.bench_faults --health-check-periods 10 2   (each fault under Serve's default, then ours)

A private cluster of the demo's shape (2 CPUs, token auth, the repository's serve_config.yaml) runs the
whole time; for each fault the load runs `--before` seconds, one replica is killed the hard way
(`ray.kill`, as a crash would), and the load goes on until the stage serves again plus `--after`
seconds. One row per fault, counting the answers in flight at the kill or started after it:
- ok: complete answers;
- failed before the first byte: an HTTP error status (the gateway gave up within its budget);
- cut with an error event: started, then ended with an SSE error event and [DONE];
- truncated: started and ended without either (must never happen);
- transport errors (over the whole run): the connection broke (expected only for streams on a killed
  gateway replica);
- recovered after: seconds from the kill until a replacement replica ran (and the gateway served).
The gateway fault runs with 2 gateway replicas, so one is left to take new requests.
"""

from __future__ import annotations

import os

# Before anything imports ray or torch: token auth on, no usage stats, one BLAS thread.
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from control import cluster
from control.document import load_serve_config
from control.serve_config import pipeline_configs
from rag.auth import create_key_file, read_client_key
from rag.ingest import ingest_directory
from rag.loadgen import LoadGenerator, LoadResult
from tests.support import cluster as support

REPO = Path(__file__).resolve().parents[1]
STAGES = ("Embedder", "Retriever", "Pipeline", "Generator")
FAULTS = (*STAGES, "Gateway")
COLUMNS = ("fault", "health check s", "requests", "ok", "failed before 1st byte", "cut with error event", "truncated",
           "transport errors", "recovered after s")


def running(dashboard: str, app: str, deployment: str) -> set[str]:
    details = cluster.applications(dashboard).get(app, {}).get("deployments", {}).get(deployment, {})
    return {r["replica_id"] for r in details.get("replicas", []) if r.get("state") == "RUNNING"}


def recovered(dashboard: str, gateway: str, app: str, deployment: str, before: set[str], timeout_s: float) -> float:
    """Seconds until a replica other than the killed ones runs and the gateway is ready again."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if running(dashboard, app, deployment) - before and cluster.readiness(gateway)[0] == 200:
            return time.monotonic() - started
        time.sleep(0.25)
    return float("nan")


def row(fault: str, period: str, result: LoadResult, since: float, recovered_s: float) -> dict[str, Any]:
    answers = [a for a in result.answers if a.started_at + a.total_s >= since]  # in flight at the kill, or later
    started = [a for a in answers if a.status == 200]
    return {"fault": fault, "health check s": period, "requests": len(answers) + len(result.errors),
            "ok": sum(1 for a in answers if a.complete),
            "failed before 1st byte": sum(1 for a in answers if a.status != 200),
            "cut with error event": sum(1 for a in started if a.error and a.done),
            "truncated": sum(1 for a in started if not a.complete and not (a.error and a.done)),
            "transport errors": len(result.errors), "recovered after s": round(recovered_s, 1)}


def run_fault(fault: str, period: str, dashboard: str, gateway: str, key: str,
              args: argparse.Namespace) -> dict[str, Any]:
    app, deployment = ("gateway", "Gateway") if fault == "Gateway" else ("v1", fault)
    before = running(dashboard, app, deployment)
    with LoadGenerator(gateway, api_key=key, concurrency=args.clients, max_seconds=args.before + 300,
                       max_requests=1_000_000) as load:
        time.sleep(args.before)
        killed_at = time.time()
        support.kill_replica(dashboard, app, deployment)
        recovered_s = recovered(dashboard, gateway, app, deployment, before, 240)
        time.sleep(args.after)
    result = row(fault, period, load.result, killed_at, recovered_s)
    refused = sorted({a.status for a in load.result.answers
                      if a.started_at + a.total_s >= killed_at and a.status != 200})
    print(f"[{fault}, health check {period} s] killed one of {len(before)} replica(s); "
          f"recovered after {recovered_s:.1f}s; refusals with status {refused or 'none'}", flush=True)
    return result


def table(rows: list[dict[str, Any]]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(str(r[c]).rjust(w) for c, w in zip(COLUMNS, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--before", type=float, default=10, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=10, help="seconds of load after the recovery")
    parser.add_argument("--piece-delay", type=float, default=0.02, help="seconds between streamed pieces")
    parser.add_argument("--health-check-periods", nargs="+", type=float, default=[],
                        help="run every fault once per health_check_period_s given (default: as serve_config.yaml)")
    args = parser.parse_args(argv)
    periods: list[float | None] = list(args.health_check_periods) or [None]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp:
        work = Path(tmp)
        config = next(iter(pipeline_configs(load_serve_config(REPO / "serve_config.yaml")).values()))
        ingest_directory(REPO / "data" / "sample_kb", work / "kb", "samples", config)
        create_key_file(work / "api_key")
        port = support.free_port()
        gateway = f"http://127.0.0.1:{port}"
        common = {"http_port": port, "kb_root": work / "kb", "gateway_args": {"api_key_file": str(work / "api_key")},
                  "pipeline_args": {"generation": {"extractive_piece_delay_s": args.piece_delay}}}
        key = read_client_key(work / "api_key")
        with support.private_cluster() as dashboard:
            for period in periods:
                label = "as configured" if period is None else f"{period:g}"
                checks = {} if period is None else {d: {"health_check_period_s": period}
                                                    for d in (*STAGES, "Gateway", "KnowledgeBases")}
                demo = cluster.write_config(REPO / "serve_config.yaml", work / "demo.yaml",
                                              deployment_options=checks, **common)
                cluster.deploy(demo, dashboard)
                cluster.wait_ready(gateway, timeout_s=300, dashboard=dashboard)
                for fault in [f for f in args.faults if f != "Gateway"]:
                    rows.append(run_fault(fault, label, dashboard, gateway, key, args))
                if "Gateway" in args.faults:
                    two = cluster.write_config(REPO / "serve_config.yaml", work / "two-gateways.yaml",
                                               deployment_options={**checks, "Gateway": {
                                                   **checks.get("Gateway", {}), "num_replicas": 2}}, **common)
                    cluster.deploy(two, dashboard)
                    while len(running(dashboard, "gateway", "Gateway")) < 2:
                        time.sleep(0.5)
                    cluster.wait_ready(gateway, timeout_s=300, dashboard=dashboard)
                    rows.append(run_fault("Gateway", label, dashboard, gateway, key, args))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
