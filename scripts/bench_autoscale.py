"""Serverless under a load ramp: replicas per stage over time, latency and losses per phase, the cold start
from zero, and the same ramp on fixed replicas of the same CPU budget, side by side in one run.

    .venv/bin/python -m scripts.bench_autoscale [--ramp 1:30,4:30,16:60,4:30,1:30] [--idle-s 60]
        [--piece-delay 0.01] [--scenarios autoscaled fixed rollout] [--rollout-clients 16]
        [--json var/bench_autoscale.json]

Each scenario gets a fresh private Ray cluster of the demo's shape (2 CPUs) with the sample knowledge base:
  autoscaled  serve_config.yaml as shipped (every stage autoscales), except that the version's stages may go
              to zero after --idle-s / 2 s idle (min_replicas 0, initial_replicas 1), so the run ends with a
              cold start from zero.
  fixed       the same config with one fixed replica per stage, each reserving what the autoscaled stage
              reserves at max_replicas (the same CPU budget); no scaling, no idle phase.
  rollout     serve_config.yaml as shipped under --rollout-clients streaming clients: once v1 has scaled
              up, `rollout start v2` (a new revision, so every stage is new) runs to its end under the
              load; then the rollout's status and reason, the answers lost, and replicas per stage of
              both versions while it ran.
The ramp is phases of CLIENTS:SECONDS of streaming clients, back to back; then (autoscaled) --idle-s of
no traffic, then one question, whose time to first token is the cold start, split into its parts from
the replicas' lifecycle events and Serve's replica records: autoscaler (the question arrived -> Serve
created the replica), process start (-> its constructor ran: worker process, imports), load (model,
index) and warm-up (the Pipeline's warm-up waits for the other stages), and when each was ready.
--zero names the stages that may go to zero (default all four; e.g. --zero Pipeline Retriever Generator
keeps the Embedder warm).
Columns per phase: sent, failed (HTTP status != 200), truncated (no finish or [DONE], or an error event),
transport errors, answers/s, p50/p99 time to first token, replicas seen per stage (min-max).
"""

import os

# Before anything imports ray or torch: token auth on, no usage stats, one BLAS thread.
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from control import cluster
from rag.client import stream_chat
from rag.lifecycle import read_events
from rag.loadgen import LoadGenerator, LoadResult
from tests.support.service import LocalService, running_service

STAGES = ("Pipeline", "Embedder", "Retriever", "Generator")
SCENARIOS = ("autoscaled", "fixed", "rollout")
# The rollout scenario's rollout: short steps, so it runs while the ramp's peak lasts.
ROLLOUT = {"steps": [25, 50, 100], "interval_s": 10, "min_requests": 10, "max_wait_intervals": 4,
           "drain_timeout_s": 90, "start_timeout_s": 240}


def parse_ramp(text: str) -> list[tuple[int, float]]:
    phases = []
    for part in text.split(","):
        clients, seconds = part.split(":")
        phases.append((int(clients), float(seconds)))
    return phases


class ReplicaSampler:
    """Running replicas per stage of `version`, sampled every `interval_s` on a thread: (time, counts)."""

    def __init__(self, service: LocalService, version: str = "v1", interval_s: float = 1.0) -> None:
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.present: dict[str, int] = {}  # replicas in any live state (starting, running, stopping) now
        self._service, self._version, self._interval_s = service, version, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ReplicaSampler":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                deployments = cluster.applications(self._service.dashboard)[self._version]["deployments"]
            except Exception:  # the dashboard may be briefly busy: skip a sample
                continue
            self.samples.append((time.time(), {name: sum(r["state"] == "RUNNING" for r in d.get("replicas", []))
                                               for name, d in deployments.items()}))
            self.present = {name: len(d.get("replicas", [])) for name, d in deployments.items()}

    def between(self, start: float, end: float) -> dict[str, str]:
        seen: dict[str, list[int]] = {}
        for at, counts in self.samples:
            if start <= at <= end:
                for name, n in counts.items():
                    seen.setdefault(name, []).append(n)
        return {name: f"{min(ns)}-{max(ns)}" if min(ns) != max(ns) else str(ns[0]) for name, ns in seen.items()}


def phase_row(result: LoadResult, seconds: float) -> dict[str, Any]:
    complete = [a for a in result.answers if a.complete]
    return {"sent": result.sent, "failed": len(result.failed), "truncated": len(result.truncated),
            "transport_errors": len(result.errors), "answers_per_s": round(len(complete) / seconds, 2),
            "ttft_p50_s": _round(result.percentile(lambda a: a.first_token_s, 0.5)),
            "ttft_p99_s": _round(result.percentile(lambda a: a.first_token_s, 0.99))}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def overrides(scenario: str, idle_s: float, zero: list[str]) -> dict[str, Any]:
    """deployment_options for a scenario, from the shipped config's autoscaling bounds."""
    from control.document import load_serve_config

    shipped = load_serve_config(Path(__file__).resolve().parents[1] / "serve_config.yaml")
    version = next(a for a in shipped["applications"] if a["name"] == "v1")
    options: dict[str, Any] = {}
    for d in version["deployments"]:
        auto, cpus = dict(d["autoscaling_config"]), d["ray_actor_options"]["num_cpus"]
        if scenario == "fixed":
            options[d["name"]] = {"num_replicas": 1,
                                  "ray_actor_options": {"num_cpus": round(cpus * auto["max_replicas"], 3)}}
        elif d["name"] in zero:
            options[d["name"]] = {"autoscaling_config": {**auto, "min_replicas": 0, "initial_replicas": 1,
                                                         "downscale_to_zero_delay_s": idle_s / 2}}
    return options


def run_scenario(scenario: str, ramp: list[tuple[int, float]], idle_s: float, piece_delay: float,
                 zero: list[str], work: Path) -> dict[str, Any]:
    pipeline_args = {"generation": {"extractive_piece_delay_s": piece_delay}}
    options = overrides(scenario, idle_s, zero)
    with running_service(work, pipeline_args=pipeline_args, deployment_options=options) as service, \
            ReplicaSampler(service) as sampler:
        phases = []
        for clients, seconds in ramp:
            began = time.time()
            with LoadGenerator(service.gateway, api_key=service.api_key, concurrency=clients,
                               max_seconds=seconds) as load:
                time.sleep(seconds)
            ended = time.time()
            row = {"phase": f"{clients} clients", **phase_row(load.result, ended - began),
                   "replicas": sampler.between(began, ended)}
            phases.append(row)
            print(f"  {scenario} {row}", flush=True)
        report: dict[str, Any] = {"phases": phases}
        if scenario == "autoscaled":
            report["cold_start"] = cold_start(service, sampler, idle_s, zero)
        return report


def cold_start(service: LocalService, sampler: ReplicaSampler, idle_s: float, zero: list[str]) -> dict[str, Any]:
    """Idle until every `zero` stage is at zero, its last replica stopped (or `idle_s` ran out), then one
    question: its first token and the start of the replicas it woke, in parts. (A question that arrives
    while the last replica still drains waits for Serve's ordinary upscale delay, not its cold-start
    path: seconds more.)"""
    deadline = time.monotonic() + idle_s
    while time.monotonic() < deadline and not (sampler.present and not any(
            n for stage, n in sampler.present.items() if stage in zero)):
        time.sleep(1)
    at_zero = [s for s, n in (sampler.samples[-1][1] if sampler.samples else {}).items() if n == 0]
    asked = time.time()
    with service.client(timeout=120) as client:
        answer = stream_chat(client, "Where is the Ray dashboard?")
    report: dict[str, Any] = {"stages_at_zero": sorted(at_zero), "status": answer.status, "complete": answer.complete,
                              "first_token_s": _round(answer.first_token_s), "parts": {}}
    details = cluster.applications(service.dashboard)["v1"]["deployments"]
    events = [e for e in read_events(service.events_file) if e.get("ts", 0) >= asked - 1]
    for stage in STAGES:
        for replica in details.get(stage, {}).get("replicas", []):
            mine = {e["event"]: e for e in events if e.get("replica") == replica["replica_id"]}
            if "READY" in mine and "STARTUP" in mine:
                created = replica.get("start_time_s") or asked
                report["parts"][stage] = {"autoscaler_s": _round(created - asked),
                                          "process_start_s": _round(mine["STARTUP"]["ts"] - created),
                                          "load_s": _round(mine["READY"]["load_s"]),
                                          "warmup_s": _round(mine["READY"]["warmup_s"]),
                                          "ready_after_request_s": _round(mine["READY"]["ts"] - asked)}
    return report


def run_rollout(clients: int, piece_delay: float, work: Path) -> dict[str, Any]:
    from control.rollout import Rollout

    pipeline_args = {"generation": {"extractive_piece_delay_s": piece_delay}}
    log: list[str] = []
    with running_service(work, pipeline_args=pipeline_args, gateway_args={"rollout": ROLLOUT}) as service, \
            ReplicaSampler(service, "v1") as stable, ReplicaSampler(service, "v2") as canary, \
            LoadGenerator(service.gateway, api_key=service.api_key, concurrency=clients, max_seconds=900) as load:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (stable.samples and max(stable.samples[-1][1].values()) > 1):
            time.sleep(1)  # until some stage of v1 has scaled up
        began = time.time()
        client = cluster.ClusterClient(service.dashboard, service.gateway, service.api_key)
        status = Rollout(service.config_path, client, say=log.append).start("v2", "v1", {"revision": "rollout-bench"})
        ended = time.time()
        time.sleep(5)
    result = load.result
    return {"status": status, "reason": next((line for line in reversed(log) if "ROLLOUT_DONE" in line), ""),
            "checks": [line for line in log if "ROLLOUT_CHECK" in line],
            "seconds": round(ended - began, 1), **phase_row(result, ended - began),
            "v1_replicas": stable.between(began, ended), "v2_replicas": canary.between(began, ended)}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    columns = ("phase", "sent", "failed", "truncated", "transport_errors", "answers_per_s", "ttft_p50_s", "ttft_p99_s")
    print("\n" + " | ".join(["scenario", *columns, "replicas (P/E/R/G)"]))
    for scenario, report in results.items():
        for row in report.get("phases", []):
            counts = "/".join(row["replicas"].get(s, "?") for s in STAGES)
            print(" | ".join([scenario, *(str(row[c]) for c in columns), counts]))
    if {"autoscaled", "fixed"} <= set(results):
        auto, fixed = results["autoscaled"]["phases"], results["fixed"]["phases"]
        peak = max(range(len(auto)), key=lambda i: auto[i]["sent"])
        ratio = auto[peak]["answers_per_s"] / fixed[peak]["answers_per_s"] if fixed[peak]["answers_per_s"] else None
        p99 = (auto[peak]["ttft_p99_s"], fixed[peak]["ttft_p99_s"])
        print(f"\npeak phase ({auto[peak]['phase']}): autoscaled / fixed answers per second = "
              f"{ratio:.2f}x; ttft p99 {p99[0]} s vs {p99[1]} s" if ratio else "\npeak phase: no fixed answers")
    rollout = results.get("rollout")
    if rollout:
        print(f"\nrollout of v2 under load while the stages scale: {rollout['status']} after {rollout['seconds']} s; "
              f"sent {rollout['sent']}, failed {rollout['failed']}, truncated {rollout['truncated']}, transport errors "
              f"{rollout['transport_errors']}; replicas (P/E/R/G) v1 "
              + "/".join(rollout["v1_replicas"].get(s, "?") for s in STAGES) + ", v2 "
              + "/".join(rollout["v2_replicas"].get(s, "?") for s in STAGES) + f"\n  {rollout['reason']}")
        for line in rollout["checks"]:
            print(f"  {line}")
    cold = results.get("autoscaled", {}).get("cold_start")
    if cold:
        print(f"\ncold start from zero ({', '.join(cold['stages_at_zero']) or 'no stage'} at zero): status "
              f"{cold['status']}, complete {cold['complete']}, first token after {cold['first_token_s']} s")
        for stage, parts in cold["parts"].items():
            print(f"  {stage}: " + ", ".join(f"{k} {v}" for k, v in parts.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ramp", default="1:30,4:30,16:60,4:30,1:30", help="CLIENTS:SECONDS phases")
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--piece-delay", type=float, default=0.01)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--zero", nargs="+", choices=STAGES, default=list(STAGES),
                        help="stages that may scale to zero in the autoscaled scenario")
    parser.add_argument("--rollout-clients", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    ramp = parse_ramp(args.ramp)
    results = {}
    for scenario in args.scenarios:
        with tempfile.TemporaryDirectory(prefix=f"bench-autoscale-{scenario}-") as work:
            print(f"scenario {scenario}: ramp {args.ramp}", flush=True)
            if scenario == "rollout":
                results[scenario] = run_rollout(args.rollout_clients, args.piece_delay, Path(work))
            else:
                results[scenario] = run_scenario(scenario, ramp, args.idle_s, args.piece_delay, args.zero, Path(work))
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
