"""Ingest: embedding through the Embedder deployment vs. in-process, and incremental vs. full builds.

    .venv/bin/python -m scripts.bench_ingest [--files 150] [--json var/bench_ingest.json]

One run, side by side on this machine:
1. in-process `TextEmbedder.embed` over a corpus (synthetic, about 20 chunks per file, or `--docs`),
   batches of 256;
2. a full build of that corpus as a knowledge base, then a one-file change (in-process embedder);
3. on a private 2-CPU cluster with the repo's config: the same texts through the v1 Embedder's
   `embed_many` (what the knowledge-base API uses), then the same full build and one-file change
   through `POST /knowledge_base/upload_docs`.
Both embedding sides run with OMP_NUM_THREADS=1, as serve_config.yaml gives the replicas.
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
from tests.support import cluster as support

REPO = Path(__file__).resolve().parent.parent
BATCH = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=40, help="synthetic documents (about 20 chunks each)")
    parser.add_argument("--docs", type=Path, default=None, help="a folder of real documents instead (e.g. the "
                        "man pages of scripts/eval_retrieval.py --render-to)")
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
        throughput = rate(texts, embedder.embed)
        kb_store.create(work, "bench", "", config.embedding.model)
        build = lambda changes: update_knowledge_base(work, "bench", config, changes, embed=embedder.embed)  # noqa: E731
        full_s, full = timed(lambda: build(Changes(add=dict(docs))))
        one_s, one = timed(lambda: build(Changes(add=_one_changed(docs))))
    finally:
        embedder.close()
    return {"embed_per_s": throughput, "full_build_s": full_s, "chunks": full.manifest.count,
            "one_file_s": one_s, "one_file_embedded": one.embedded}


def through_serve(docs: dict[str, bytes], texts: list[str], work: Path) -> dict[str, Any]:
    support.use_token_auth()  # before Ray is imported: it reads RAY_AUTH_MODE once, at import
    from ray import serve

    key_file = work / "api_key"
    create_key_file(key_file)
    port = support.free_port()
    config = cluster.write_config(REPO / "serve_config.yaml", work / "serve_config.yaml", http_port=port,
                              kb_root=work / "kb", gateway_args={"api_key_file": str(key_file)})
    first = next(iter(pipeline_configs(load_serve_config(config)).values()))
    from rag.ingest import ingest_directory

    ingest_directory(REPO / "data" / "sample_kb", work / "kb", "samples", first)
    with support.private_cluster() as dashboard:
        cluster.deploy(config, dashboard=dashboard)
        gateway = f"http://127.0.0.1:{port}"
        cluster.wait_ready(gateway, timeout_s=300, dashboard=dashboard)
        handle = serve.get_deployment_handle("Embedder", app_name=first.version)
        throughput = rate(texts, lambda batch: handle.embed_many.remote(batch).result(timeout_s=300))
        with gateway_client(gateway, read_client_key(key_file), timeout=600) as http:
            http.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": "bench"}).raise_for_status()
            full_s, _ = timed(lambda: upload(http, docs))
            one_s, one = timed(lambda: upload(http, _one_changed(docs), override=True))
    return {"embed_per_s": throughput, "full_build_s": full_s, "one_file_s": one_s,
            "one_file_embedded": one["embedded"]}


def _one_changed(docs: dict[str, bytes]) -> dict[str, bytes]:
    name = sorted(docs)[len(docs) // 2]
    return {name: docs[name] + b"\n\nOne more paragraph, appended to change this file and nothing else."}


def upload(http: Any, docs: dict[str, bytes], override: bool = False) -> dict[str, Any]:
    names = list(docs)
    view: dict[str, Any] = {}
    for start in range(0, len(names), 50):  # as a client would: batches of 50 files
        part = [("files", (n, docs[n])) for n in names[start:start + 50]]
        response = http.post("/knowledge_base/upload_docs", files=part,
                             data={"knowledge_base_name": "bench", "override": str(override).lower()})
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
    with tempfile.TemporaryDirectory() as tmp:
        local = in_process(docs, texts, config, Path(tmp) / "local")
        print(f"in-process: {json.dumps(local)}", flush=True)
        served = through_serve(docs, texts, Path(tmp) / "served")
    report(local, served, len(texts))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"in_process": local, "serve": served}, indent=2))
    return 0


def report(local: dict[str, Any], served: dict[str, Any], chunks: int) -> None:
    print(f"\n{args_line(chunks)}\n")
    print("| measure | in-process | through Serve | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| embedding, chunks/s | {local['embed_per_s']:.0f} | {served['embed_per_s']:.0f} | "
          f"{served['embed_per_s'] / local['embed_per_s']:.2f} |")
    print(f"| full build, s | {local['full_build_s']:.1f} | {served['full_build_s']:.1f} | |")
    print(f"| one-file change, s | {local['one_file_s']:.2f} | {served['one_file_s']:.2f} | |")
    for side, row in (("in-process", local), ("through Serve", served)):
        print(f"one-file change / full build, {side}: {row['one_file_s'] / row['full_build_s']:.3f} "
              f"({row['one_file_embedded']} chunks embedded)")


def args_line(chunks: int) -> str:
    return f"corpus: {chunks} chunks (750/150 splitter), embedding batches of {BATCH}, OMP_NUM_THREADS=1"


if __name__ == "__main__":
    sys.exit(main())
