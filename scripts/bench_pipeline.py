"""Latency and throughput of search and streaming chat through the Serve HTTP endpoint, against the
Serve floor (the same topology with no work in it) and the same pipeline in-process, all in one run.

    .venv/bin/python -m scripts.bench_pipeline [--requests 64] [--concurrency 1 8] [--json var/bench.json]

Search is retrieval only (embed + FAISS); chat is one streamed answer, timed to its first piece and its end.
The floor is `scripts.floor_app`, deployed beside the project on the same cluster under /floor for the
run and deleted after it; the project's numbers are reported as ratios to it. In-process is
`LocalPipeline` (first version in --config) pinned to the index version that --url serves.

Then, at the highest concurrency, where two cores are the limit: the CPU each request takes in every
process of each side (`scripts.cpu_by_process`, summed over --cpu-rounds interleaved cells), the
in-process side's CPU per request as the work, and the share of the floor's throughput that the floor
plus that work would allow, so the gap splits into the work and the project's own overhead.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports torch or the hub libraries
os.environ.setdefault("OMP_NUM_THREADS", "1")  # what serve_config.yaml gives the replicas

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from time import perf_counter
from typing import Any

import httpx
import numpy as np
import torch

from control import cluster
from control.document import load_serve_config
from control.serve_config import GATEWAY_BUILDER, PIPELINE_BUILDER, is_app, pipeline_configs
from rag.auth import bearer
from rag.client import DEFAULT_KEY_FILE, client_key, gateway_client, stream_chat
from rag.config import PipelineConfig
from rag.constants import resolve_path
from rag.embedding import TextEmbedder
from rag.kb_versions import list_versions
from rag.local_pipeline import LocalPipeline
from rag.records import AnswerDelta, AnswerEnd, Question
from rag.retrieval import Retriever
from scripts import cpu_by_process
from tests.support import cluster as support

QUESTIONS = [
    "How do I upgrade the service without dropping requests?", "How do I shift traffic from version v1 to v2?",
    "Which embedding model does the embedder use, and does it need network access?",
    "Where are the knowledge base index versions stored on disk?", "Which settings control the chunk size?",
    "How do I ingest a folder of PDF and Markdown files into a knowledge base?",
    "What happens to answers that are still streaming when a replica is drained?", "如何不中断服务地升级知识库？"]
TIMEOUT_S = 60.0  # per request, both sides
ROWS = [("search", "search", "latency_s"), ("chat first token", "chat", "first_token_s"),
        ("chat last token", "chat", "latency_s")]
FLOOR_APP, FLOOR_PREFIX = "floor", "/floor"
# The goal for the project against the floor: p50 latency at most 1.3 times the floor's,
# throughput at least 90 % of the floor's.
GOAL_LATENCY_RATIO, GOAL_THROUGHPUT = 1.3, 0.9
Sample = dict[str, Any]  # ok, latency_s, first_token_s, error
Op = Callable[[str], Awaitable[Sample]]  # one timed request


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the Serve gateway")
    parser.add_argument("--api-key-file", default=DEFAULT_KEY_FILE, help="the gateway's API key (first line)")
    parser.add_argument("--config", default="serve_config.yaml", help="Serve config of the in-process pipeline")
    parser.add_argument("--kb", default="samples", help="knowledge base to ask")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="in-flight requests per cell")
    parser.add_argument("--requests", type=int, default=64, help="measured requests per cell")
    parser.add_argument("--warmup", type=int, default=8, help="unmeasured requests per operation and side")
    parser.add_argument("--cpu-rounds", type=int, default=5,
                        help="rounds of cells at the highest concurrency whose CPU use is summed (0: none)")
    parser.add_argument("--json", default=None, help="write the raw results to this path")
    parser.add_argument("--ray-address", default="auto", help="the cluster serving --url (to deploy the floor on)")
    return parser.parse_args(argv)


def sample(ok: bool, latency_s: float, first_token_s: float | None = None, error: str | None = None) -> Sample:
    return {"ok": ok, "latency_s": latency_s, "first_token_s": first_token_s, "error": None if ok else error}


def pin_served_index(config: PipelineConfig, url: str, kb: str, api_key: str | None) -> PipelineConfig | None:
    """`config` pinned to the index version that retrieves what the service does ("latest" may have moved)."""
    top_k, root, threshold = config.retrieval.top_k, config.retrieval.kb_root_path, config.retrieval.score_threshold
    served = [[(int(d["id"]), round(d["score"], 3)) for d in httpx.post(
        f"{url}/knowledge_base/search_docs", json={"query": q, "knowledge_base_name": kb, "top_k": top_k},
        headers=bearer(api_key), timeout=30).raise_for_status().json()] for q in QUESTIONS]
    embedder = TextEmbedder(config.embedding)
    embedder.load()
    vectors = embedder.embed(QUESTIONS)
    for version in reversed(list_versions(root, kb)):
        # The Retriever, not the bare index: in `auto` mode the service fuses dense and BM25 rankings.
        retrieval = config.retrieval.model_copy(update={"knowledge_bases": {kb: version}, "discover": False})
        retriever = Retriever(retrieval, config.embedding.vector_space, model_languages=config.embedding.languages)
        retriever.load()
        found = [[(p.id, round(p.score, 3)) for p in retriever.search(kb, vector, top_k, threshold, question)]
                 for question, vector in zip(QUESTIONS, vectors, strict=True)]
        retriever.close()
        if found == served:
            return config.model_copy(update={"retrieval": retrieval})
    return None


def _p50_ms(action: Callable[[str], Any], rounds: int = 8, gap_s: float = 0.0) -> float:
    """p50 ms of `action` over the questions; `gap_s` idles between calls, as a stage idles between the
    calls the service makes at concurrency 1 (code that runs after idling runs slower: caches go cold)."""
    times = []
    for _ in range(rounds):
        for question in QUESTIONS:
            if gap_s:
                time.sleep(gap_s)
            started = perf_counter()
            action(question)
            times.append(perf_counter() - started)
    return float(np.median(times) * 1000)


def _embedding_cost(settings: Any, gap_s: float = 0.0) -> tuple[dict[str, float], dict[str, np.ndarray], str]:
    embedder = TextEmbedder(settings)
    embedder.load()
    embedder.warmup()
    try:
        costs = {"hot": _p50_ms(lambda q: embedder.embed_queries([q]))}
        if gap_s:
            costs["paced"] = _p50_ms(lambda q: embedder.embed_queries([q]), gap_s=gap_s)
        how = embedder.describe()
        return costs, {q: embedder.embed_queries([q])[0] for q in QUESTIONS}, f"{how['runtime']} {how['precision']}"
    finally:
        embedder.close()


def stage_costs(config: PipelineConfig, kb: str, gap_s: float) -> dict[str, Any]:
    """p50 ms per question of each in-process stage on one thread, back to back ("hot") and once per `gap_s`
    ("paced", as the service calls each stage at concurrency 1): the question's embedding (the configured
    runtime, and PyTorch's for reference) and retrieval, so the table's gap to the floor can be split into
    work and Serve overhead."""
    embed, vectors, runtime = _embedding_cost(config.embedding, gap_s)
    torch_embed, _, _ = _embedding_cost(config.embedding.model_copy(update={"runtime": "torch"}))
    retriever = Retriever(config.retrieval, config.embedding.vector_space, model_languages=config.embedding.languages)
    retriever.load()
    top_k, threshold = config.retrieval.top_k, config.retrieval.score_threshold
    search = lambda q: retriever.search(kb, vectors[q], top_k, threshold, q)  # noqa: E731
    retrieve = {"hot": _p50_ms(search), "paced": _p50_ms(search, gap_s=gap_s)}
    retriever.close()
    return {"embed": embed, "runtime": runtime, "embed on torch": torch_embed["hot"], "retrieve": retrieve,
            "gap_ms": gap_s * 1000}


async def paced_chat_ms(config: PipelineConfig, kb: str, gap_s: float, rounds: int = 4) -> float:
    """p50 ms to the first answer piece of the in-process pipeline, one question per `gap_s` (as the service
    answers at concurrency 1): the chat's work as the service meets it, for the chat line."""
    pipe = LocalPipeline(config)
    pipe.load()
    await pipe.warmup()
    chat = local_ops(pipe, kb, config.retrieval.top_k)["chat"]
    firsts = []
    for _ in range(rounds):
        for question in QUESTIONS:
            await asyncio.sleep(gap_s)
            if (first := (await chat(question))["first_token_s"]) is not None:
                firsts.append(first)
    pipe.close()
    return float(np.median(firsts) * 1000)


def local_ops(pipe: LocalPipeline, kb: str, top_k: int) -> dict[str, Op]:
    async def search(text: str) -> Sample:
        started = perf_counter()
        await pipe.pipeline.retrieve(Question(text, kb, top_k=top_k))
        return sample(True, perf_counter() - started)

    async def chat(text: str) -> Sample:
        started, first, end = perf_counter(), None, None
        async for event in pipe.pipeline.answer(Question(text, kb)):
            if isinstance(event, AnswerDelta) and first is None:
                first = perf_counter() - started
            end = event if isinstance(event, AnswerEnd) else end
        ok = first is not None and end is not None and end.finish_reason in ("stop", "length")
        return sample(ok, perf_counter() - started, first, f"incomplete stream, end {end}")
    return {"search": search, "chat": chat}


def http_ops(client: httpx.Client, kb: str, top_k: int) -> dict[str, Op]:
    """Blocking httpx calls (the project's `stream_chat` for chat), each run in a thread."""
    def search(text: str) -> Sample:
        started = perf_counter()
        response = client.post("/knowledge_base/search_docs",
                               json={"query": text, "knowledge_base_name": kb, "top_k": top_k})
        return sample(response.status_code == 200, perf_counter() - started, error=f"HTTP {response.status_code}")

    def chat(text: str) -> Sample:
        answer = stream_chat(client, text, kb)
        return sample(answer.complete and answer.first_token_s is not None, answer.total_s, answer.first_token_s,
                      f"HTTP {answer.status} done={answer.done} finish={answer.finish_reason} error={answer.error}")
    return {"search": partial(asyncio.to_thread, search), "chat": partial(asyncio.to_thread, chat)}


async def run_cell(side: str, name: str, op: Op, concurrency: int, n: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Sample:
        async with gate:
            started = perf_counter()
            try:
                return await asyncio.wait_for(op(QUESTIONS[i % len(QUESTIONS)]), TIMEOUT_S)
            except Exception as exc:
                return sample(False, perf_counter() - started, error=repr(exc))
    started, cpu = perf_counter(), cpu_by_process.snapshot(FLOOR_APP)
    samples = await asyncio.gather(*(one(i) for i in range(n)))
    wall, failed = perf_counter() - started, [s for s in samples if not s["ok"]]
    cpu_ms = cpu_by_process.used_between(cpu, cpu_by_process.snapshot(FLOOR_APP))
    print(f"  {side:10} {name:6} c={concurrency:<2} {n:3} requests {wall:5.1f}s {len(failed)} failed", file=sys.stderr)
    return {"side": side, "op": name, "concurrency": concurrency, "wall_s": wall, "failures": len(failed),
            "throughput": (n - len(failed)) / wall, "errors": sorted({s["error"] for s in failed})[:5],
            "cpu_ms": cpu_ms, "samples": samples}


async def bench(args: argparse.Namespace, config: PipelineConfig) -> list[dict[str, Any]]:
    # asyncio.to_thread (HTTP calls, the in-process embedder) would otherwise run at most cpus + 4 at once.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max(args.concurrency)))
    pipe, cells, top_k, key = LocalPipeline(config), [], config.retrieval.top_k, client_key(args.api_key_file)
    pipe.load()
    await pipe.warmup()
    options: dict[str, Any] = {"timeout": httpx.Timeout(TIMEOUT_S, connect=5.0),
                               "limits": httpx.Limits(max_connections=2 * max(args.concurrency))}
    with gateway_client(args.url, key, **options) as client, \
            gateway_client(args.url + FLOOR_PREFIX, key, **options) as floor_client:
        sides = {"in-process": local_ops(pipe, args.kb, top_k), "serve": http_ops(client, args.kb, top_k),
                 "floor": http_ops(floor_client, args.kb, top_k)}
        for name in ("search", "chat"):  # the sides alternate, so a noisy neighbour hits all alike
            for side, ops_ in sides.items():
                await run_cell(side, name, ops_[name], max(args.concurrency), args.warmup)  # warm-up, not measured
            for c in args.concurrency:
                cells += [await run_cell(side, name, ops_[name], c, args.requests) for side, ops_ in sides.items()]
        # CPU per request from several short cells, interleaved and summed: Ray's periodic work (a metrics
        # scrape, a collection) lands in one cell of a second or two and would decide a single one.
        for _ in range(args.cpu_rounds):
            for name in ("search", "chat"):
                cells += [{**await run_cell(side, name, ops_[name], max(args.concurrency), args.requests),
                           "cpu_round": True} for side, ops_ in sides.items()]
    pipe.close()
    return cells


def project_deployments(serve_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The settings of the gateway's and the first pipeline version's deployments, by name."""
    found: dict[str, dict[str, Any]] = {}
    for builder in (GATEWAY_BUILDER, PIPELINE_BUILDER):
        app = next(a for a in serve_config["applications"] if is_app(a, builder))
        found.update({d["name"]: d for d in app.get("deployments") or []})
    return found


@contextmanager
def serve_floor(args: argparse.Namespace) -> Iterator[None]:
    """The floor deployed beside the project on its cluster for the block, and deleted after it, even
    when the block fails."""
    support.use_token_auth()  # before Ray is imported: it reads RAY_AUTH_MODE once, at import
    import ray
    from ray import serve

    from scripts.floor_app import build_floor_app

    options = project_deployments(load_serve_config(args.config))
    ray.init(address=args.ray_address, log_to_driver=False)
    try:
        started = perf_counter()
        serve.run(build_floor_app(str(resolve_path(args.api_key_file)), options), name=FLOOR_APP,
                  route_prefix=FLOOR_PREFIX, blocking=False)
        print(f"floor: deployed at {args.url}{FLOOR_PREFIX} in {perf_counter() - started:.1f}s", file=sys.stderr)
        yield
    finally:
        serve.delete(FLOOR_APP)
        ray.shutdown()


def percentiles_ms(cell: dict[str, Any], key: str) -> list[float]:
    values = [s[key] for s in cell["samples"] if s["ok"] and s[key] is not None]
    return [float(v) * 1000 for v in np.percentile(values, [50, 99])] if values else [np.nan, np.nan]


def comparisons(cells: list[dict[str, Any]], concurrency: list[int]) -> list[dict[str, Any]]:
    """One row per operation and concurrency: each side's p50/p99 and req/s, the project against the
    floor (latency ratio, throughput share) and against in-process (overhead)."""
    by, rows = {(c["side"], c["op"], c["concurrency"]): c for c in cells if not c.get("cpu_round")}, []
    for label, op, key in ROWS:
        for c in concurrency:
            row: dict[str, Any] = {"operation": label, "concurrency": c}
            for side in ("in-process", "floor", "serve"):
                cell = by[(side, op, c)]
                row[side] = dict(zip(("p50_ms", "p99_ms"), percentiles_ms(cell, key), strict=True),
                                 throughput=cell["throughput"])
            floor, served = row["floor"], row["serve"]
            row["latency_ratio"] = _ratio(served["p50_ms"], floor["p50_ms"])
            row["p99_ratio"] = _ratio(served["p99_ms"], floor["p99_ms"])
            row["throughput_of_floor"] = _ratio(served["throughput"], floor["throughput"])
            row["overhead_ms"] = served["p50_ms"] - row["in-process"]["p50_ms"]
            rows.append(row)
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")  # a floor side that failed every request has no rate


def print_report(cells: list[dict[str, Any]], rows: list[dict[str, Any]], args: argparse.Namespace) -> int:
    print(f"\n{'operation':<17}{'conc':>5} | {'floor p50':>9}{'p99':>9} | {'serve p50':>9}{'p99':>9} | "
          f"{'x floor':>7}{'p99 x':>7} | {'floor req/s':>11}{'serve req/s':>12}{'% floor':>8} | "
          f"{'in-proc p50':>11}{'req/s':>7}\n" + "-" * 132)
    for r in rows:
        floor, served, local = r["floor"], r["serve"], r["in-process"]
        print(f"{r['operation']:<17}{r['concurrency']:>5} | {floor['p50_ms']:>7.1f}ms{floor['p99_ms']:>7.1f}ms | "
              f"{served['p50_ms']:>7.1f}ms{served['p99_ms']:>7.1f}ms | {r['latency_ratio']:>7.2f}"
              f"{r['p99_ratio']:>7.2f} | {floor['throughput']:>11.1f}{served['throughput']:>12.1f}"
              f"{r['throughput_of_floor']:>7.0%} | {local['p50_ms']:>9.1f}ms{local['throughput']:>7.1f}")
    failures = sum(c["failures"] for c in cells)
    for cell in (c for c in cells if c["errors"]):
        print(f"  failed: {cell['side']} {cell['op']} c={cell['concurrency']}: {cell['errors']}")
    met = [r for r in rows if r["latency_ratio"] <= GOAL_LATENCY_RATIO and r["throughput_of_floor"] >= GOAL_THROUGHPUT]
    print(f"\nagainst the floor (goal: p50 at most {GOAL_LATENCY_RATIO}x, throughput at least {GOAL_THROUGHPUT:.0%}): "
          f"{len(met)} of {len(rows)} rows meet it")
    added = [f"{r['overhead_ms']:.1f} ms to {r['operation']} at concurrency {r['concurrency']}"
             for r in rows[::len(args.concurrency)]]
    print(f"summary: Serve adds (p50, over in-process) {'; '.join(added)}; failures {failures} of "
          f"{len(cells) * args.requests} -> {'valid run' if failures == 0 else 'INVALID run'}")
    return failures


def print_cpu(cells: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Where the CPU goes per request in the CPU rounds, the project's processes next to the floor's, and
    how much of the difference the work itself explains: the in-process side runs the same pipeline
    with no Serve, so its CPU per request is the work."""
    rounds = [c for c in cells if c.get("cpu_round") and c["cpu_ms"]]
    if not rounds:
        return  # --cpu-rounds 0, or no /proc here
    concurrency = rounds[0]["concurrency"]
    used: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))  # CPU ms by process
    requests: dict[tuple[str, str], int] = defaultdict(int)
    for cell in rounds:
        side_op = (cell["side"], cell["op"])
        requests[side_op] += len(cell["samples"])
        for key, ms in cell["cpu_ms"].items():
            used[side_op][key] += ms
    per = {(side, op): cpu_by_process.per_request(used[(side, op)], "floor" if side == "floor" else "project",
                                                  requests[(side, op)]) for side, op in requests}
    ops = sorted({op for _, op in per}, key=["search", "chat"].index)
    print(f"\nCPU per request at concurrency {concurrency}, ms (from /proc, over {len(rounds) // len(per)} interleaved "
          "cells per side; each side in its own cells, the other side's idle replicas left out)")
    print(f"{'process':<36}" + "".join(f" | {op + ': floor':>13}{'serve':>7}{'+serve':>7}" for op in ops))
    for name in per[("floor", ops[0])]:
        pairs = [(per[("floor", op)][name], per[("serve", op)][name]) for op in ops]
        print(f"{name:<36}" + "".join(f" | {f:>13.1f}{s:>7.1f}{s - f:>+7.1f}" for f, s in pairs))
    for op, label in (("search", "search"), ("chat", "chat last token")):
        floor, served = per[("floor", op)]["total"], per[("serve", op)]["total"]
        work = per[("in-process", op)][cpu_by_process.CLIENT]
        measured = next(r["throughput_of_floor"] for r in rows if r["operation"] == label
                        and r["concurrency"] == concurrency)
        print(f"{op} at concurrency {concurrency}: the floor {floor:.1f} ms + the work {work:.1f} ms (the same "
              f"pipeline in-process) = {floor + work:.1f} ms against the project's {served:.1f} ms, where the cores "
              f"are the limit: {floor / served:.0%} of the floor's throughput (one cell in the table above: "
              f"{measured:.0%}), and {floor / (floor + work):.0%} with no overhead of its own; that overhead is "
              f"{served - floor - work:.1f} ms of CPU per request")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (ready := cluster.readiness(args.url))[0] != 200:
        print(f"error: GET {args.url}/ready is not 200 {ready}: start the service first (make demo)", file=sys.stderr)
        return 2
    config = next(iter(pipeline_configs(load_serve_config(args.config)).values()))
    root = config.retrieval.kb_root_path
    config = pin_served_index(config, args.url, args.kb, client_key(args.api_key_file))
    if config is None:
        print(f"error: no index of {args.kb!r} in {root} retrieves what {args.url} does", file=sys.stderr)
        return 2
    with serve_floor(args):
        cells = asyncio.run(bench(args, config))
    info = {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"],
            "loadavg_1m": round(os.getloadavg()[0], 2), "pipeline": config.version,
            "kb": f"{args.kb} v{config.retrieval.knowledge_bases[args.kb]} in {root}"}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    rows = comparisons(cells, args.concurrency)
    failures = print_report(cells, rows, args)
    floor_p50 = next(r["floor"]["p50_ms"] for r in rows if r["operation"] == "search" and r["concurrency"] == 1)
    serve_p50 = next(r["serve"]["p50_ms"] for r in rows if r["operation"] == "search" and r["concurrency"] == 1)
    costs = stage_costs(config, args.kb, gap_s=serve_p50 / 1000)
    embed, retrieve = costs["embed"], costs["retrieve"]
    work = embed["paced"] + retrieve["paced"]
    print(f"work per search, in-process on one thread (p50): back to back, embed {embed['hot']:.1f} ms "
          f"({costs['runtime']}; {costs['embed on torch']:.1f} ms on torch) and retrieve {retrieve['hot']:.1f} ms; "
          f"once per {serve_p50:.0f} ms, as the service calls them at concurrency 1, embed {embed['paced']:.1f} ms "
          f"and retrieve {retrieve['paced']:.1f} ms (code that runs after idling runs slower). The floor "
          f"{floor_p50:.1f} ms + that work = {floor_p50 + work:.1f} ms against the project's {serve_p50:.1f} ms "
          f"(the rest, {serve_p50 - floor_p50 - work:.1f} ms, is the project's own overhead)")
    floor_chat, serve_chat = (next(r[side]["p50_ms"] for r in rows if r["operation"] == "chat first token"
                                   and r["concurrency"] == 1) for side in ("floor", "serve"))
    costs["chat first token paced"] = chat_work = asyncio.run(paced_chat_ms(config, args.kb, serve_chat / 1000))
    print(f"work per chat, in-process (p50 to the first piece): once per {serve_chat:.0f} ms {chat_work:.1f} ms; "
          f"the floor {floor_chat:.1f} ms + that work = {floor_chat + chat_work:.1f} ms against the project's "
          f"{serve_chat:.1f} ms (the rest, {serve_chat - floor_chat - chat_work:.1f} ms, is the project's own "
          "overhead)")
    print_cpu(cells, rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": info, "args": vars(args), "comparisons": rows, "stage_costs": costs,
                       "cells": cells}, fh, indent=1)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
