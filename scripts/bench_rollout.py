"""Upgrade under full load, three ways: what reaches the clients, and how long the old server lingers.

    .venv/bin/python -m scripts.bench_rollout [--clients 8] [--seconds 240] [--piece-delay 0.005] [--upgrade-at 0.5]
        [--trigger revision|num-cpus] [--scenarios project gunicorn serve-defaults] [--json var/bench_rollout.json]

K streaming clients ask questions for T seconds (one answer piece every --piece-delay s); at --upgrade-at x T
the server is upgraded. Scenarios, each on fresh ports, one after another:
  project         serve_config.yaml on a private local Ray cluster, upgraded by `serve deploy` (cluster.deploy) of
                  a config that replaces every pipeline stage (a new args.revision, or --trigger num-cpus).
  gunicorn        scripts.baseline_app (same pipeline, in-process) under Gunicorn + Uvicorn workers, upgraded
                  by Gunicorn's reload: `kill -HUP <master>`.
  serve-defaults  the same Serve app and upgrade, with Ray's defaults for surge, drain and max_ongoing_requests.
  canary          this project's rollout tool moving all traffic to a new version (5/25/50/100 %) under the same
                  load: promote, then removal of the old version. Reported per phase.
  rollback        the same with a canary that fails 50 % of its answers (faults.error_rate): rolled back by itself.
Quality scenarios (--scenarios quality-same quality-half-index quality-threshold quality-failing): 4 streaming
clients, each with its own `user` id (sticky), a rollout with its shadow stage; v1 pins the index of the whole
sample KB. The candidate is: identical in behaviour (a new revision: promoted); pinned to an index built from half
the KB's files; given a score_threshold that drops nearly every passage; failing 50 % of its answers (each rolled
back). Their table: the verdict and the rule and numbers that decided it, the users' answers the candidate
served, failed and truncated answers, time to verdict, and the users' TTFT in the shadow stage against before it.
Columns: sent; failed (HTTP status != 200); truncated (200 but no finish reason or [DONE], or an error event);
transport errors (refused, reset, timeout); p50/p99 time to first token and total (complete answers only);
drain: from the upgrade's trigger until the old replicas / workers are gone.
"""

import os

# Before anything imports ray or torch: token auth on, no usage stats, one BLAS thread.
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})

import argparse
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from control import cluster
from control.document import ServeDocument, load_serve_config
from control.rollout import Rollout
from control.serve_config import PIPELINE_BUILDER, is_app, pipeline_configs
from rag.auth import create_key_file, read_client_key
from rag.ingest import ingest_directory
from rag.loadgen import LoadGenerator, LoadResult
from scripts.cpu_by_process import proc_stat
from tests.support import cluster as support

REPO = Path(__file__).resolve().parents[1]
SOURCE_CONFIG = REPO / "serve_config.yaml"
UPGRADES = ("project", "gunicorn", "serve-defaults")
ROLLOUTS = ("canary", "rollback")
QUALITY = {"quality-same": {"revision": "2"},
           "quality-half-index": {"retrieval.knowledge_bases": {"samples": 2}},  # built in main()
           "quality-threshold": {"retrieval.score_threshold": 0.9},
           "quality-failing": {"faults": {"error_rate": 0.5}}}
SCENARIOS = UPGRADES + ROLLOUTS + tuple(QUALITY)
# What scenario (c) deletes from every deployment, so Ray's defaults apply (surge 0, 20 s drain, 5 ongoing).
SERVE_TUNING = ("max_surge_percent", "graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s",
                "max_ongoing_requests")
REQUEST_TIMEOUT_S, DRAIN_LIMIT_S = 120.0, 300.0  # bounds on one answer and on waiting for the old server to go
COLUMNS = ("sent", "failed", "truncated", "transport_errors", "ttft_p50_s", "ttft_p99_s", "total_p50_s",
           "total_p99_s", "drain_s")
OldGone = Callable[[], bool]  # polled after the upgrade: True once the old server is gone
Target = tuple[str, Callable[[], OldGone]]  # the base URL, and what triggers the upgrade


def wait_for(condition: Callable[[], Any], timeout_s: float, interval_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while not (done := bool(condition())) and time.monotonic() < deadline:
        time.sleep(interval_s)
    return done


def strip_tuning(path: Path) -> Path:
    doc = ServeDocument.load(path)
    for deployment in (d for app in doc.data["applications"] for d in app.get("deployments") or []):
        for key in SERVE_TUNING:
            deployment.pop(key, None)
    doc.save(path)
    return path


def upgrade_overrides(trigger: str) -> dict[str, Any]:
    """`cluster.write_config` overrides that replace the replica of every pipeline stage."""
    source = load_serve_config(SOURCE_CONFIG)
    if trigger == "revision":  # a new code revision: Serve rebuilds the application
        return {"pipeline_args": {"revision": f"{next(iter(pipeline_configs(source).values())).revision}-up"}}
    app = next(a for a in source["applications"] if is_app(a, PIPELINE_BUILDER))
    return {"deployment_options": {d["name"]: {"ray_actor_options": {
        **d["ray_actor_options"], "num_cpus": d["ray_actor_options"]["num_cpus"] + 0.01}} for d in app["deployments"]}}


def serve_configs(work: Path, kb: Path, port: int, args: argparse.Namespace, defaults: bool) -> list[Path]:
    """The config to start with and the upgraded one."""
    paths = []
    for name, overrides in (("start", {}), ("upgraded", upgrade_overrides(args.trigger))):
        pipeline_args = {"generation": {"extractive_piece_delay_s": args.piece_delay},
                         **overrides.get("pipeline_args", {})}
        path = cluster.write_config(SOURCE_CONFIG, work / f"{name}.yaml", http_port=port, kb_root=kb,
                                pipeline_args=pipeline_args, deployment_options=overrides.get("deployment_options"),
                                gateway_args={"api_key_file": str(args.key_file)})
        paths.append(strip_tuning(path) if defaults else path)
    return paths


def deploy(path: Path, dashboard: str, checked: bool) -> None:
    if checked:
        return cluster.deploy(path, dashboard)
    # Deliberately bypasses rag.config.check_serve_config (called by cluster.deploy): it refuses Ray's defaults
    # because a 60 s stream can outlive Serve's default 20 s drain. That refusal is this project's safety
    # net; the serve-defaults scenario measures what happens without it.
    result = cluster.run_cli("serve", "deploy", str(path), "--address", dashboard, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"serve deploy failed:\n{result.stdout}\n{result.stderr}")


def replicas(dashboard: str, app: str) -> dict[str, dict[str, str]] | None:
    """{deployment: {replica id: state}} of an application; None if the dashboard did not answer."""
    with contextlib.suppress(Exception):  # the dashboard can be slow to answer on a busy machine
        deployments = cluster.applications(dashboard).get(app, {}).get("deployments", {})
        return {name: {r["replica_id"]: r["state"] for r in d.get("replicas", [])} for name, d in deployments.items()}
    return None


def replaced(dashboard: str, app: str, before: dict[str, dict[str, str]]) -> bool:
    """Every deployment runs a new replica and none of its old ones is left, in any state. (While Serve
    rebuilds an application its deployments may be missing from the status: that is not "replaced".)"""
    now = replicas(dashboard, app) or {}
    return all(name in now and not set(now[name]) & set(old) and "RUNNING" in now[name].values()
               for name, old in before.items())


def serve_upgrade(path: Path, dashboard: str, checked: bool, app: str) -> OldGone:
    if not (before := replicas(dashboard, app)):
        raise RuntimeError(f"no replicas of application {app!r} to replace")
    deploy(path, dashboard, checked)
    return lambda: replaced(dashboard, app, before)


@contextlib.contextmanager
def serve_target(work: Path, kb: Path, args: argparse.Namespace, defaults: bool) -> Iterator[Target]:
    """A private local cluster (its own dashboard and HTTP ports) with the service deployed and ready."""
    http_port = support.free_port()
    start, upgraded = serve_configs(work, kb, http_port, args, defaults)
    app = next(a["name"] for a in load_serve_config(start)["applications"]
               if is_app(a, PIPELINE_BUILDER))
    with support.private_cluster() as dashboard:
        gateway = f"http://127.0.0.1:{http_port}"
        deploy(start, dashboard, checked=not defaults)
        cluster.wait_ready(gateway, timeout_s=300, dashboard=dashboard)
        yield gateway, lambda: serve_upgrade(upgraded, dashboard, not defaults, app)


def gunicorn_reload(master: int) -> OldGone:
    """Gunicorn's reload: it starts new workers and sends the old ones SIGTERM (they drain, --graceful-timeout)."""
    old = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and proc_stat(int(p.name))[1:2] == [
        str(master)]]
    os.kill(master, signal.SIGHUP)
    return lambda: all(proc_stat(pid)[:1] in ([], ["Z"]) for pid in old)


def gunicorn_ready(base_url: str, workers: int, timeout_s: float) -> None:
    """Until /ready has answered from every worker (each poll is a new connection), or the timeout."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < workers and time.monotonic() < deadline:
        status, body = cluster.readiness(base_url)
        seen |= {int(body["pid"])} if status == 200 else set()
        time.sleep(0.2)
    if not seen:
        raise TimeoutError(f"{base_url}/ready did not answer 200 within {timeout_s}s")


def stop_group(process: subprocess.Popen[bytes], timeout_s: float = 45) -> None:
    """SIGTERM to the process group (Gunicorn drains its workers), SIGKILL if it takes too long."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, sig)
            process.wait(timeout=wait_s)
            return


@contextlib.contextmanager
def gunicorn_target(work: Path, kb: Path, delay: float) -> Iterator[Target]:
    port, workers = support.free_port(), 2
    command = [str(Path(sys.executable).parent / "gunicorn"), "scripts.baseline_app:app",
               "-k", "uvicorn.workers.UvicornWorker", "-w", str(workers), "--graceful-timeout", "30",
               "--no-control-socket", "-b", f"127.0.0.1:{port}"]
    env = {**os.environ, "RAG_KB_ROOT": str(kb), "RAG_PIECE_DELAY_S": str(delay)}
    with (work / "gunicorn.log").open("wb") as log:
        master = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            gunicorn_ready(f"http://127.0.0.1:{port}", workers, 180)
            yield f"http://127.0.0.1:{port}", lambda: gunicorn_reload(master.pid)
        finally:
            stop_group(master)


def summarize(scenario: str, result: LoadResult, drain_s: float | None, drained_under_load: bool) -> dict[str, Any]:
    pct = result.percentile
    return {"scenario": scenario, "sent": result.sent, "failed": len(result.failed),
            "truncated": len(result.truncated), "transport_errors": len(result.errors),
            "ttft_p50_s": pct(lambda a: a.first_token_s, 0.5), "ttft_p99_s": pct(lambda a: a.first_token_s, 0.99),
            "total_p50_s": pct(lambda a: a.total_s, 0.5), "total_p99_s": pct(lambda a: a.total_s, 0.99),
            "drain_s": drain_s, "drained_while_load_ran": drained_under_load,
            "samples": sorted({f"HTTP {a.status}: {(a.error or 'no [DONE]')[:150]}" for a in result.failed
                               + result.truncated} | {f"transport: {e[:150]}" for e in result.errors})[:8],
            "answers": [{"status": a.status, "complete": a.complete, "first_token_s": a.first_token_s,
                         "total_s": a.total_s, "error": a.error} for a in result.answers]}


def measure(scenario: str, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """The load for --seconds, with the upgrade triggered at --upgrade-at of it; waits for the drain."""
    base_url, upgrade = target
    with LoadGenerator(base_url, api_key=read_client_key(args.key_file), concurrency=args.clients,
                       max_seconds=args.seconds,
                       max_requests=10_000_000, timeout_s=REQUEST_TIMEOUT_S) as load:
        time.sleep(args.seconds * args.upgrade_at)
        triggered = time.monotonic()
        print(f"[{scenario}] upgrading after {load.result.sent} requests", flush=True)
        drained = wait_for(upgrade(), DRAIN_LIMIT_S)
        drain_s = time.monotonic() - triggered if drained else None
        under_load = time.monotonic() < load.deadline
        time.sleep(max(0.0, load.deadline - time.monotonic()))
    return summarize(scenario, load.result, drain_s, drained and under_load)


def run_scenario(scenario: str, work: Path, kb: Path, args: argparse.Namespace) -> dict[str, Any]:
    (work / scenario).mkdir()
    print(f"[{scenario}] starting", flush=True)
    target = (gunicorn_target(work / scenario, kb, args.piece_delay) if scenario == "gunicorn"
              else serve_target(work / scenario, kb, args, defaults=scenario == "serve-defaults"))
    try:
        with target as ready:
            return measure(scenario, ready, args)
    except Exception as exc:  # one broken scenario must not hide the others' results
        print(f"[{scenario}] error: {exc!r}", flush=True)
        return {"scenario": scenario, "error": f"{type(exc).__name__}: {exc}"}


def rollout_config(work: Path, kb: Path, port: int, args: argparse.Namespace) -> Path:
    rollout = {"steps": [5, 25, 50, 100], "interval_s": args.step_seconds, "min_requests": 10,
               "max_wait_intervals": 3, "drain_timeout_s": DRAIN_LIMIT_S}
    return cluster.write_config(SOURCE_CONFIG, work / "rollout.yaml", http_port=port, kb_root=kb,
                            pipeline_args={"generation": {"extractive_piece_delay_s": args.piece_delay}},
                            gateway_args={"rollout": rollout, "api_key_file": str(args.key_file)})


def phase_rows(scenario: str, result: LoadResult, marks: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """One row per rollout phase: the answers that started between one applied step and the next."""
    bounds = [*marks, (float("inf"), "")]
    rows = []
    for (begin, label), (end, _) in itertools.pairwise(bounds):
        part = LoadResult(answers=[a for a in result.answers if begin <= a.started_at < end])
        if part.answers:
            rows.append({**summarize(f"{scenario}: {label}", part, None, True), "answers": []})
    return rows


@contextlib.contextmanager
def deployed(path: Path, http_port: int) -> Iterator[tuple[str, str]]:
    """A private cluster serving `path`, ready: (dashboard, gateway)."""
    with support.private_cluster() as dashboard:
        gateway = f"http://127.0.0.1:{http_port}"
        cluster.deploy(path, dashboard)
        cluster.wait_ready(gateway, timeout_s=300, dashboard=dashboard)
        yield dashboard, gateway


def rollout_scenario(scenario: str, work: Path, kb: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Under the load, the rollout tool moves traffic to a new version (or gives up on a faulty one)."""
    http_port = support.free_port()
    path = rollout_config(work, kb, http_port, args)
    marks: list[tuple[float, str]] = []

    def note(line: str) -> None:
        if line.startswith("event=ROLLOUT_APPLY"):
            marks.append((time.time(), line.split('what="')[1].split('"')[0][:40]))
        print(f"[{scenario}] {line}", flush=True)

    try:
        with deployed(path, http_port) as (dashboard, gateway):
            faults = {"faults": {"error_rate": 0.5}} if scenario == "rollback" else {}
            with LoadGenerator(gateway, api_key=read_client_key(args.key_file), concurrency=args.clients,
                               max_seconds=DRAIN_LIMIT_S * 4,
                               max_requests=10_000_000, timeout_s=REQUEST_TIMEOUT_S) as load:
                time.sleep(args.step_seconds)
                marks.append((0.0, "before the rollout"))
                client = cluster.ClusterClient(dashboard, gateway, read_client_key(args.key_file))
                status = Rollout(path, client, say=note).start(
                    "v2", "v1", {"revision": "2", **faults})
                marks.append((time.time(), f"after: {status}"))
                time.sleep(args.step_seconds)
        whole = {**summarize(f"{scenario} ({status})", load.result, None, True), "answers": []}
        return [whole, *phase_rows(scenario, load.result, marks)]
    except Exception as exc:
        print(f"[{scenario}] error: {exc!r}", flush=True)
        return [{"scenario": scenario, "error": f"{type(exc).__name__}: {exc}"}]


def quality_scenario(scenario: str, work: Path, kb: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Sticky clients while a candidate goes through the shadow stage (and the steps, if it passes)."""
    http_port = support.free_port()
    rollout = {"steps": [25, 50, 100], "interval_s": 5, "min_requests": 10, "max_wait_intervals": 4,
               "drain_timeout_s": DRAIN_LIMIT_S}
    path = cluster.write_config(SOURCE_CONFIG, work / "rollout.yaml", http_port=http_port, kb_root=kb,
                                pipeline_args={"generation": {"extractive_piece_delay_s": args.piece_delay},
                                               "retrieval": {"knowledge_bases": {"samples": 1}, "discover": False}},
                                gateway_args={"rollout": rollout, "api_key_file": str(args.key_file)})
    marks: dict[str, float] = {}

    def note(line: str) -> None:
        if line.startswith("event=ROLLOUT_APPLY") and "shadow:" in line:
            marks["shadow"] = time.time()
        if line.startswith("event=ROLLOUT_APPLY") and "step 1/" in line:
            marks["steps"] = time.time()
        print(f"[{scenario}] {line[:400]}", flush=True)

    try:
        key = read_client_key(args.key_file)
        with deployed(path, http_port) as (dashboard, gateway), \
                LoadGenerator(gateway, api_key=key, concurrency=4, sticky_users=True, max_seconds=DRAIN_LIMIT_S * 4,
                              max_requests=10_000_000, timeout_s=REQUEST_TIMEOUT_S) as load:
            time.sleep(args.step_seconds)
            began = time.time()
            driver = Rollout(path, cluster.ClusterClient(dashboard, gateway, key), say=note)
            status = driver.start("v2", "v1", QUALITY[scenario])
            ended = time.time()
            time.sleep(3)
        state = driver.load_state()
        decided = state.history[-1] if state and state.history else {}
        answers = load.result.answers

        def during(start: float, end: float) -> LoadResult:
            return LoadResult(answers=[a for a in answers if start <= a.started_at < end])

        before = during(0, began)
        shadow = during(marks.get("shadow", ended), marks.get("steps", ended))
        served = sum(1 for a in answers if a.version == "v2" and a.started_at < ended)
        ttft = [before.percentile(_ttft, 0.5), shadow.percentile(_ttft, 0.5)]
        return {"scenario": scenario, "verdict": status, "rule": decided.get("rule"),
                "at": decided.get("step"), "served_by_candidate": served if status != "promoted" else "-",
                "sent": load.result.sent, "failed": len(load.result.failed), "truncated": len(load.result.truncated),
                "verdict_s": round(ended - began, 1), "ttft_p50_before_s": ttft[0], "ttft_p50_shadow_s": ttft[1],
                "ttft_p99_before_s": before.percentile(_ttft, 0.99),
                "ttft_p99_shadow_s": shadow.percentile(_ttft, 0.99),
                "p50_ratio": ttft[1] / ttft[0] if ttft[0] and ttft[1] else None,
                "reason": decided.get("reason", state.reason if state else "")}
    except Exception as exc:
        print(f"[{scenario}] error: {exc!r}", flush=True)
        return {"scenario": scenario, "error": f"{type(exc).__name__}: {exc}"}


def _ttft(answer: Any) -> float | None:
    return answer.first_token_s if answer.complete else None


QUALITY_COLUMNS = ("verdict", "rule", "at", "served_by_candidate", "sent", "failed", "truncated", "verdict_s",
                   "ttft_p50_before_s", "ttft_p50_shadow_s", "p50_ratio", "ttft_p99_before_s", "ttft_p99_shadow_s")


def quality_table(rows: list[dict[str, Any]]) -> str:
    header = ["scenario", *(key.removesuffix("_s").replace("_", " ") for key in QUALITY_COLUMNS)]
    lines = [header] + [[row["scenario"], *(fmt(row.get(key)) for key in QUALITY_COLUMNS)] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["quality rollouts: 4 sticky streaming clients; goal: the candidate serves 0 answers unless promoted, "
            "0 failed, 0 truncated, shadow p50 TTFT <= 1.2x before"]
    text += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
             for line in lines]
    text += [f"  {row['scenario']}: {row.get('error') or row.get('reason')}" for row in rows]
    return "\n".join(text)


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    header = ["scenario", *(key.removesuffix("_s").replace("_", " ") for key in COLUMNS)]
    lines = [header] + [[row["scenario"], *(fmt(row.get(key)) for key in COLUMNS)] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"clients={args.clients} seconds={args.seconds:g} piece_delay={args.piece_delay:g}s "
            f"upgrade at {args.upgrade_at:g} x seconds, trigger={args.trigger}, rollout step={args.step_seconds:g}s"]
    text += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
             for line in lines]
    for row in rows:
        late = row.get("drained_while_load_ran") is False and "the old server was still draining when the load ended"
        text += [f"  {row['scenario']}: {note}" for note in [row.get("error"), *row.get("samples", []), late] if note]
    return "\n".join(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    # On 2 cores, 8 clients get ~12 answers/s at 0.005 s pacing (~4/s at 0.02): 240 s gives (a) >= 2,000 requests.
    parser.add_argument("--seconds", type=float, default=240, help="how long the load runs per scenario")
    parser.add_argument("--piece-delay", type=float, default=0.005, help="seconds between streamed pieces")
    parser.add_argument("--upgrade-at", type=float, default=0.5, help="when to upgrade, as a fraction of --seconds")
    parser.add_argument("--trigger", choices=("revision", "num-cpus"), default="revision",
                        help="Serve upgrade: bump args.revision (new code) or nudge every stage's num_cpus")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(UPGRADES + ROLLOUTS),
                        help="default: the upgrades and rollouts; `make bench-quality` runs the quality ones")
    parser.add_argument("--step-seconds", type=float, default=20, help="rollout: observation interval per step")
    parser.add_argument("--json", default=None, help="write the raw results to this path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        work = Path(tmp)  # the sample KB is ingested once, for every scenario
        args.key_file = work / "api_key"  # the private gateways' key; the repo's var/api_key is untouched
        create_key_file(args.key_file)
        ingest_directory(REPO / "data" / "sample_kb", work / "kb", "samples",
                         next(iter(pipeline_configs(load_serve_config(SOURCE_CONFIG)).values())))
        if any(s in QUALITY for s in args.scenarios):  # index version 2: half the files, for quality-half-index
            half = work / "half_kb"
            half.mkdir()
            for file in sorted((REPO / "data" / "sample_kb").iterdir())[::2]:
                (half / file.name).write_bytes(file.read_bytes())
            ingest_directory(half, work / "kb", "samples",
                             next(iter(pipeline_configs(load_serve_config(SOURCE_CONFIG)).values())))
        quality = []
        for scenario in args.scenarios:
            if scenario in QUALITY:
                (work / scenario).mkdir()
                quality.append(quality_scenario(scenario, work / scenario, work / "kb", args))
            elif scenario in ROLLOUTS:
                (work / scenario).mkdir()
                rows += rollout_scenario(scenario, work / scenario, work / "kb", args)
            else:
                rows.append(run_scenario(scenario, work, work / "kb", args))
    if rows:
        print(table(rows, args))
    if quality:
        print(quality_table(quality))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows, "quality": quality}, indent=1,
                                              default=str),
                                   encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
