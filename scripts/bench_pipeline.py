"""Latency of search and streaming chat: the Serve HTTP endpoint vs. the same pipeline in-process.

    .venv/bin/python -m scripts.bench_pipeline [--requests 64] [--concurrency 1 8] [--json var/bench.json]

Search is retrieval only (embed + FAISS); chat is one streamed answer, timed to its first piece and its end.
In-process is `LocalPipeline` (first version in --config) pinned to the index version that --url serves.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports torch or the hub libraries
os.environ.setdefault("OMP_NUM_THREADS", "1")  # what serve_config.yaml gives the replicas

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from time import perf_counter
from typing import Any

import httpx
import numpy as np
import torch

from deployments.ops import readiness
from rag.auth import bearer
from rag.client import DEFAULT_KEY_FILE, client_key, gateway_client, stream_chat
from rag.config import PipelineConfig, load_serve_config, pipeline_configs
from rag.embedding import TextEmbedder
from rag.index import list_versions
from rag.pipeline import LocalPipeline
from rag.records import AnswerDelta, AnswerEnd, Question
from rag.retrieval import Retriever

QUESTIONS = [
    "How do I upgrade the service without dropping requests?", "How do I shift traffic from version v1 to v2?",
    "Which embedding model does the embedder use, and does it need network access?",
    "Where are the knowledge base index versions stored on disk?", "Which settings control the chunk size?",
    "How do I ingest a folder of PDF and Markdown files into a knowledge base?",
    "What happens to answers that are still streaming when a replica is drained?", "如何不中断服务地升级知识库？"]
TIMEOUT_S = 60.0  # per request, both sides
ROWS = [("search", "search", "latency_s"), ("chat first token", "chat", "first_token_s"),
        ("chat last token", "chat", "latency_s")]
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
    parser.add_argument("--json", default=None, help="write the raw results to this path")
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
        retriever = Retriever(retrieval, config.embedding.model, model_languages=config.embedding.languages)
        retriever.load()
        found = [[(p.id, round(p.score, 3)) for p in retriever.search(kb, vector, top_k, threshold, question)]
                 for question, vector in zip(QUESTIONS, vectors, strict=True)]
        retriever.close()
        if found == served:
            return config.model_copy(update={"retrieval": retrieval})
    return None


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
    started = perf_counter()
    samples = await asyncio.gather(*(one(i) for i in range(n)))
    wall, failed = perf_counter() - started, [s for s in samples if not s["ok"]]
    print(f"  {side:10} {name:6} c={concurrency:<2} {n:3} requests {wall:5.1f}s {len(failed)} failed", file=sys.stderr)
    return {"side": side, "op": name, "concurrency": concurrency, "wall_s": wall, "failures": len(failed),
            "throughput": (n - len(failed)) / wall, "errors": sorted({s["error"] for s in failed})[:5],
            "samples": samples}


async def bench(args: argparse.Namespace, config: PipelineConfig) -> list[dict[str, Any]]:
    # asyncio.to_thread (HTTP calls, the in-process embedder) would otherwise run at most cpus + 4 at once.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max(args.concurrency)))
    pipe, cells, top_k = LocalPipeline(config), [], config.retrieval.top_k
    pipe.load()
    await pipe.warmup()
    with gateway_client(args.url, client_key(args.api_key_file), timeout=httpx.Timeout(TIMEOUT_S, connect=5.0),
                      limits=httpx.Limits(max_connections=2 * max(args.concurrency))) as client:
        sides = {"in-process": local_ops(pipe, args.kb, top_k), "serve": http_ops(client, args.kb, top_k)}
        for name in ("search", "chat"):  # the sides alternate, so a noisy neighbour hits both alike
            for side, ops in sides.items():
                await run_cell(side, name, ops[name], max(args.concurrency), args.warmup)  # warm-up, not measured
            for c in args.concurrency:
                cells += [await run_cell(side, name, ops[name], c, args.requests) for side, ops in sides.items()]
    pipe.close()
    return cells


def print_report(cells: list[dict[str, Any]], args: argparse.Namespace) -> int:
    def ms(cell: dict[str, Any], key: str) -> list[float]:
        values = [s[key] for s in cell["samples"] if s["ok"] and s[key] is not None]
        return [float(v) * 1000 for v in np.percentile(values, [50, 99])] if values else [np.nan, np.nan]
    by, overheads = {(c["side"], c["op"], c["concurrency"]): c for c in cells}, []
    print(f"\n{'operation':<17}{'conc':>5} | {'in-proc p50':>11}{'p99':>9} | {'serve p50':>10}{'p99':>9} | "
          f"{'overhead':>9} | {'in-proc req/s':>13}{'serve req/s':>12}\n" + "-" * 105)
    for label, op, key in ROWS:
        for c in args.concurrency:
            local, served = by[("in-process", op, c)], by[("serve", op, c)]
            (l50, l99), (s50, s99) = ms(local, key), ms(served, key)
            overheads.append(f"{s50 - l50:.1f} ms to {label} at concurrency {c}")
            print(f"{label:<17}{c:>5} | {l50:>9.1f}ms{l99:>7.1f}ms | {s50:>8.1f}ms{s99:>7.1f}ms | "
                  f"{s50 - l50:>7.1f}ms | {local['throughput']:>13.1f}{served['throughput']:>12.1f}")
    failures = sum(c["failures"] for c in cells)
    for cell in (c for c in cells if c["errors"]):
        print(f"  failed: {cell['side']} {cell['op']} c={cell['concurrency']}: {cell['errors']}")
    print(f"\nsummary: Serve adds (p50) {'; '.join(overheads[::len(args.concurrency)])}; failures {failures} of "
          f"{len(cells) * args.requests} -> {'valid run' if failures == 0 else 'INVALID run'}")
    return failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (ready := readiness(args.url))[0] != 200:
        print(f"error: GET {args.url}/ready is not 200 {ready}: start the service first (make demo)", file=sys.stderr)
        return 2
    config = next(iter(pipeline_configs(load_serve_config(args.config)).values()))
    root = config.retrieval.kb_root_path
    config = pin_served_index(config, args.url, args.kb, client_key(args.api_key_file))
    if config is None:
        print(f"error: no index of {args.kb!r} in {root} retrieves what {args.url} does", file=sys.stderr)
        return 2
    cells = asyncio.run(bench(args, config))
    info = {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"],
            "loadavg_1m": round(os.getloadavg()[0], 2), "pipeline": config.version,
            "kb": f"{args.kb} v{config.retrieval.knowledge_bases[args.kb]} in {root}"}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    failures = print_report(cells, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": info, "args": vars(args), "cells": cells}, fh, indent=1)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
