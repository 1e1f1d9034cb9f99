"""Ingest: embedding runtimes side by side, in-process and through the Embedder deployment, and
incremental vs. full builds.

    .venv/bin/python -m scripts.bench_ingest [--files 150] [--runtimes torch auto] [--chat-streams 4]
                                             [--json var/bench_ingest.json]

One run, side by side on this machine, for each `embedding.runtime` in --runtimes (torch is what the
project used before the CPU runtimes; auto is today's default, OpenVINO on a CPU):
1. in-process `TextEmbedder.embed_bulk` over a corpus (synthetic, about 20 chunks per file, or `--docs`),
   batches of 256;
2. a full build of that corpus as a knowledge base, then a one-file change (in-process embedder);
3. on one private 2-CPU cluster with the repo's config (redeployed with each runtime): the same texts
   through the v1 Embedder's `embed_many` (what the knowledge-base API uses), then the same full build
   and one-file change through `POST /knowledge_base/upload_docs`, under --chat-streams streaming
   chats (0: none) that run through the whole upload, with their failures counted.
The process and the replicas run with OMP_NUM_THREADS=1, as serve_config.yaml gives the replicas.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports torch or the hub libraries
os.environ.setdefault("OMP_NUM_THREADS", "1")  # what serve_config.yaml gives the replicas

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from langchain_core.documents import Document

from control import cluster
from control.document import load_serve_config
from control.serve_config import pipeline_configs
from rag import kb_store
from rag.auth import create_key_file, read_client_key
from rag.client import gateway_client
from rag.config import PipelineConfig
from rag.documents import split_documents
from rag.embedding import TextEmbedder
from rag.kb_build import Changes, update_knowledge_base
from rag.loadgen import LoadGenerator
from tests.support import cluster as support

REPO = Path(__file__).resolve().parent.parent
BATCH = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=40, help="synthetic documents (about 20 chunks each)")
    parser.add_argument("--docs", type=Path, default=None, help="a folder of real documents instead (e.g. the "
                        "man pages of scripts/eval_retrieval.py --render-to)")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "auto"],
                        help="embedding.runtime values, each optionally with a precision: openvino/fp32")
    parser.add_argument("--chat-streams", type=int, default=4, help="streaming chats during the uploads")
    parser.add_argument("--json", default=None, help="write the results to this path")
    return parser.parse_args(argv)


def corpus(files: int, seed: int = 7) -> dict[str, bytes]:
    """Deterministic prose-like documents: paragraphs of words drawn from a fixed vocabulary."""
    rng = random.Random(seed)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "vi", "ro") for b in
             ("dan", "fel", "gor", "hin", "jul", "mar", "pes", "ric", "sol", "tun", "ver", "zak")]
    docs = {}
    for i in range(files):
        paragraphs = [" ".join(rng.choice(words) for _ in range(rng.randint(90, 130))) + "."
                      for _ in range(18)]
        docs[f"doc{i:04d}.md"] = f"# Document {i}\n\n" + "\n\n".join(paragraphs)
    return {name: text.encode() for name, text in docs.items()}


def embedding_settings(spec: str) -> dict[str, str]:
    runtime, _, precision = spec.partition("/")
    return {"runtime": runtime, **({"precision": precision} if precision else {})}


def chunk_texts(docs: dict[str, bytes], config: PipelineConfig) -> list[str]:
    return [d.page_content for d in split_documents(
        [Document(page_content=data.decode(), metadata={"source": n}) for n, data in docs.items()], config.splitter)]


def rate(texts: list[str], embed: Any) -> float:
    embed(texts[:BATCH])  # warm: the first call pays for lazy initialisation
    began = time.perf_counter()
    for start in range(0, len(texts), BATCH):
        embed(texts[start:start + BATCH])
    return len(texts) / (time.perf_counter() - began)


def timed(action: Any) -> tuple[float, Any]:
    began = time.perf_counter()
    result = action()
    return time.perf_counter() - began, result


def in_process(docs: dict[str, bytes], texts: list[str], config: PipelineConfig, work: Path) -> dict[str, Any]:
    embedder = TextEmbedder(config.embedding)
    embedder.load()
    try:
        throughput = rate(texts, embedder.embed_bulk)
        kb_store.create(work, "bench", "", config.embedding.vector_space)
        build = lambda changes: update_knowledge_base(work, "bench", config, changes, embed=embedder.embed_bulk)  # noqa: E731
        full_s, full = timed(lambda: build(Changes(add=dict(docs))))
        one_s, one = timed(lambda: build(Changes(add=_one_changed(docs))))
        described = embedder.describe()
    finally:
        embedder.close()
    return {"embed_per_s": throughput, "full_build_s": full_s, "chunks": full.manifest.count,
            "one_file_s": one_s, "one_file_embedded": one.embedded, "runtime": described}


def through_serve(docs: dict[str, bytes], texts: list[str], work: Path, runtimes: dict[str, dict[str, Any]],
                  chat_streams: int) -> dict[str, dict[str, Any]]:
    """Each runtime in turn on one private cluster: the repo's config redeployed with it, measured once its
    Embedder describes itself as `runtimes[runtime]` (what the same settings gave in-process)."""
    support.use_token_auth()  # before Ray is imported: it reads RAY_AUTH_MODE once, at import
    key_file = work / "api_key"
    create_key_file(key_file)
    port = support.free_port()
    results = {}
    with support.private_cluster() as dashboard:
        for n, runtime in enumerate(runtimes):
            config = cluster.write_config(REPO / "serve_config.yaml", work / f"serve_config.{n}.yaml",
                                          http_port=port, kb_root=work / "kb",
                                          gateway_args={"api_key_file": str(key_file)},
                                          pipeline_args={"embedding": embedding_settings(runtime)})
            first = next(iter(pipeline_configs(load_serve_config(config)).values()))
            if n == 0:
                from rag.ingest import ingest_directory

                ingest_directory(REPO / "data" / "sample_kb", work / "kb", "samples", first)
            cluster.deploy(config, dashboard=dashboard)
            results[runtime] = _serve_one(docs, texts, first, runtimes[runtime], f"http://127.0.0.1:{port}",
                                          dashboard, read_client_key(key_file), f"bench{n}", chat_streams)
            print(f"through Serve, {runtime}: {json.dumps(results[runtime])}", flush=True)
    return results


def _serve_one(docs: dict[str, bytes], texts: list[str], first: PipelineConfig, wanted: dict[str, Any],
               gateway: str, dashboard: str, key: str | None, kb: str, chat_streams: int) -> dict[str, Any]:
    from ray import serve

    cluster.wait_ready(gateway, timeout_s=300, dashboard=dashboard)
    handle = serve.get_deployment_handle("Embedder", app_name=first.version)
    cluster.wait_until(lambda: handle.describe.remote().result(timeout_s=60)["runtime"] == wanted,
                       300, f"the Embedder as {wanted}")
    described = handle.describe.remote().result(timeout_s=60)["runtime"]
    throughput = rate(texts, lambda batch: handle.embed_many.remote(batch).result(timeout_s=300))
    with gateway_client(gateway, key, timeout=600) as http, \
            LoadGenerator(gateway, concurrency=chat_streams, max_seconds=3600, api_key=key) as chats:
        http.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": kb}).raise_for_status()
        full_s, _ = timed(lambda: upload(http, docs, kb))
        one_s, one = timed(lambda: upload(http, _one_changed(docs), kb, override=True))
    load = chats.stop()
    return {"embed_per_s": throughput, "full_build_s": full_s, "one_file_s": one_s,
            "one_file_embedded": one["embedded"], "runtime": described,
            "chats": {"answered": len(load.answers) - len(load.failed) - len(load.truncated),
                      "failed": len(load.failed) + len(load.errors), "truncated": len(load.truncated)}}


def _one_changed(docs: dict[str, bytes]) -> dict[str, bytes]:
    name = sorted(docs)[len(docs) // 2]
    return {name: docs[name] + b"\n\nOne more paragraph, appended to change this file and nothing else."}


def upload(http: Any, docs: dict[str, bytes], kb: str, override: bool = False) -> dict[str, Any]:
    names = list(docs)
    view: dict[str, Any] = {}
    for start in range(0, len(names), 50):  # as a client would: batches of 50 files
        part = [("files", (n, docs[n])) for n in names[start:start + 50]]
        response = http.post("/knowledge_base/upload_docs", files=part,
                             data={"knowledge_base_name": kb, "override": str(override).lower()})
        response.raise_for_status()
        view = response.json()["data"]
        if response.status_code != 200:
            raise RuntimeError(f"upload did not finish in time: {view}")
    return view


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = next(iter(pipeline_configs(load_serve_config(REPO / "serve_config.yaml")).values()))
    docs = {p.name: p.read_bytes() for p in sorted(args.docs.iterdir()) if p.is_file()} if args.docs \
        else corpus(args.files)
    texts = chunk_texts(docs, config)
    local = {}
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in args.runtimes:
            variant = config.model_copy(update={"embedding": config.embedding.model_copy(
                update=embedding_settings(runtime))})
            local[runtime] = in_process(docs, texts, variant, Path(tmp) / f"local-{len(local)}")
            print(f"in-process, {runtime}: {json.dumps(local[runtime])}", flush=True)
        served = through_serve(docs, texts, Path(tmp) / "served",
                               {runtime: local[runtime]["runtime"] for runtime in args.runtimes}, args.chat_streams)
    report(local, served, len(texts), args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"in_process": local, "serve": served}, indent=2))
    return 0


def report(local: dict[str, dict[str, Any]], served: dict[str, dict[str, Any]], chunks: int,
           args: argparse.Namespace) -> None:
    print(f"\ncorpus: {chunks} chunks (750/150 splitter), embedding calls of {BATCH} texts, OMP_NUM_THREADS=1; "
          f"uploads under {args.chat_streams} streaming chats\n")
    print("| runtime | precision | in-process chunks/s | Embedder chunks/s | full build in-process, s | "
          "full upload, s | one-file upload, s (chunks embedded) | chats answered / failed / truncated |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for runtime in args.runtimes:
        here, there = local[runtime], served[runtime]
        chats = there["chats"]
        print(f"| {runtime} ({there['runtime']['runtime']}) | {there['runtime']['precision']} | "
              f"{here['embed_per_s']:.0f} | {there['embed_per_s']:.0f} | {here['full_build_s']:.1f} | "
              f"{there['full_build_s']:.1f} | {there['one_file_s']:.2f} ({there['one_file_embedded']}) | "
              f"{chats['answered']} / {chats['failed']} / {chats['truncated']} |")
    if len(args.runtimes) > 1:
        base, best = args.runtimes[0], args.runtimes[-1]
        print(f"\n{best} against {base}: Embedder chunks/s "
              f"x{served[best]['embed_per_s'] / served[base]['embed_per_s']:.2f}, "
              f"full upload x{served[base]['full_build_s'] / served[best]['full_build_s']:.2f} faster, "
              f"in-process x{local[best]['embed_per_s'] / local[base]['embed_per_s']:.2f} "
              f"(goal: at least x3 through the Embedder)")


if __name__ == "__main__":
    sys.exit(main())
