"""The embedding runtimes side by side, in-process: a question's latency, ingest throughput, and how close
each runtime's vectors are to PyTorch's.

    .venv/bin/python -m scripts.bench_embedding [--docs /tmp/heldout] [--chunks 512] [--json var/bench_embedding.json]

For each runtime (torch, onnx, openvino fp32, openvino auto, onnx int8): p50 ms of one question on the
question lane (one thread), chunks/s on the ingest lane with one batch at a time and with two side by side
(`ingest_threads` 1 and 2), and the smallest cosine between its vectors and PyTorch's over the chunks and
the questions. Chunks are 750 characters with 150 overlap, as the service splits them, from --docs (the
man pages of `scripts/eval_retrieval.py --render-to`) or the bundled sample KB.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # what serve_config.yaml gives the replicas

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rag.config import EmbeddingConfig, SplitterConfig
from rag.documents import load_directory, split_documents
from rag.embedding import TextEmbedder

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["How do I upgrade the service without dropping requests?", "which package owns /usr/bin/ls",
             "如何不中断服务地升级知识库？", "copy a file but keep its timestamps"]
RUNTIMES: dict[str, dict[str, Any]] = {
    "torch": {"runtime": "torch"}, "onnx": {"runtime": "onnx"},
    "openvino fp32": {"runtime": "openvino", "precision": "fp32"}, "openvino auto": {"runtime": "openvino"},
    "onnx int8": {"runtime": "onnx", "quantization": "int8"}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=Path, default=Path("/tmp/heldout"), help="folder of documents "
                        "(default the rendered man pages; the sample KB when it does not exist)")
    parser.add_argument("--chunks", type=int, default=512, help="chunks embedded per measurement")
    parser.add_argument("--json", default=None, help="write the results to this path")
    return parser.parse_args(argv)


def measure(settings: dict[str, Any], chunks: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for threads in (1, 2):
        embedder = TextEmbedder(EmbeddingConfig(**settings, ingest_threads=threads))
        embedder.load()
        embedder.warmup()
        started = time.perf_counter()
        vectors = embedder.embed_bulk(chunks)
        row[f"ingest_{threads}_per_s"] = len(chunks) / (time.perf_counter() - started)
        if threads == 1:
            times = []
            for _ in range(25):
                for question in QUESTIONS:
                    began = time.perf_counter()
                    embedder.embed_queries([question])
                    times.append(time.perf_counter() - began)
            row["question_ms"] = float(np.median(times) * 1000)
            row["vectors"], row["queries"] = vectors, embedder.embed_queries(QUESTIONS)
            row["described"] = embedder.describe()
        embedder.close()
        if settings["runtime"] == "torch":  # torch runs one thread per replica: no ingest lanes to compare
            break
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    docs = args.docs if args.docs.is_dir() else REPO / "data" / "sample_kb"
    chunks = [c.page_content for c in split_documents(load_directory(docs), SplitterConfig())][:args.chunks]
    rows = {name: measure(settings, chunks) for name, settings in RUNTIMES.items()}
    reference = rows["torch"]
    print(f"\n{len(chunks)} chunks from {docs}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"{os.cpu_count()} cores\n")
    print("| runtime | computes in | question, ms | ingest chunks/s, 1 batch at a time | 2 side by side | "
          "question x torch | ingest x torch | min cosine to torch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    report = {}
    for name, row in rows.items():
        cosine = min(float((row["vectors"] * reference["vectors"]).sum(axis=1).min()),
                     float((row["queries"] * reference["queries"]).sum(axis=1).min()))
        best = max(row["ingest_1_per_s"], row.get("ingest_2_per_s", 0.0))
        report[name] = {"precision": row["described"]["precision"], "question_ms": row["question_ms"],
                        "ingest_1_per_s": row["ingest_1_per_s"], "ingest_2_per_s": row.get("ingest_2_per_s"),
                        "min_cosine": cosine}
        two = f"{row['ingest_2_per_s']:.0f}" if "ingest_2_per_s" in row else "-"
        print(f"| {name} | {row['described']['precision']} | {row['question_ms']:.1f} | "
              f"{row['ingest_1_per_s']:.0f} | {two} | {reference['question_ms'] / row['question_ms']:.1f} | "
              f"{best / reference['ingest_1_per_s']:.1f} | {cosine:.5f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
