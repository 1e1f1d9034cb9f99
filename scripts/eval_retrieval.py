"""Retrieval recall of dense, BM25 and fused search on a folder of documents and a question set.

    python -m scripts.eval_retrieval --render-to /tmp/heldout     # once: render the man pages
    python -m scripts.eval_retrieval --docs /tmp/heldout --json /tmp/eval.json --cache-dir /tmp/eval-cache

The man-page corpus is not committed (licences, size): `data/eval/manpages.txt` lists the 200 page
stems, and `--render-to DIR` renders each from /usr/share/man as
`MANWIDTH=100 man -P cat -l /usr/share/man/manN/STEM.N.gz | col -b > DIR/STEM.txt` (the same
pages from another distribution release differ a little, and so may the numbers).

Questions are JSON lines `{"question": ..., "source": "<file name relative to --docs>"}`; nothing
assumes English, so a Chinese folder and question set work the same way.

Chunks are made as Chatchat does (750 characters, 150 overlap) and embedded with the bundled
MiniLM model; dense search is exact (FAISS IndexFlatIP). A question is a hit at k when its source
file is the source of any of the top-k chunks (top-k chunks, not top-k distinct pages).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import faiss
import numpy as np

from rag.config import EmbeddingConfig, SplitterConfig
from rag.documents import load_directory, split_documents
from rag.embedding import TextEmbedder
from rag.lexical import LexicalIndex, fuse

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGE_LIST = REPO_ROOT / "data" / "eval" / "manpages.txt"
QUESTIONS = REPO_ROOT / "data" / "eval" / "manpages_questions.jsonl"
MAN_ROOT = Path("/usr/share/man")
DEPTH = 50  # candidates taken from each retriever before fusion
CUTOFFS = (1, 5)
SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

Ranking = list[tuple[int, float]]


@dataclass(frozen=True)
class Question:
    text: str
    source: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=Path, default=Path("/tmp/heldout"), help="folder of documents")
    parser.add_argument("--questions", type=Path, default=QUESTIONS, help="JSON lines of question and source")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep chunk embeddings here, keyed by a hash of the chunks (a dev convenience)")
    parser.add_argument("--render-to", type=Path, default=None,
                        help="render the pages listed in --pages into this folder and exit")
    parser.add_argument("--pages", type=Path, default=PAGE_LIST, help="man page stems to render")
    parser.add_argument("--sweep", action="store_true", help="also score the hybrid at other dense weights")
    parser.add_argument("--misses", action="store_true", help="list each mode's misses at the largest cutoff")
    return parser.parse_args(argv)


def render_pages(stems: list[str], target: Path) -> None:
    """Render man pages to plain text, 100 columns wide, without overstrike formatting."""
    target.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "MANWIDTH": "100"}
    for stem in stems:
        found = sorted(MAN_ROOT.glob(f"man*/{stem}.[0-9]*"))
        if not found:
            raise SystemExit(f"no man page {stem!r} under {MAN_ROOT}")
        page = subprocess.run(["man", "-P", "cat", "-l", str(found[0])], env=environment,
                              capture_output=True, check=True).stdout
        plain = subprocess.run(["col", "-b"], input=page, capture_output=True, check=True).stdout
        (target / f"{stem}.txt").write_bytes(plain)


def read_questions(path: Path) -> list[Question]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Question(line["question"], line["source"]) for line in lines]


def embed_chunks(embedder: TextEmbedder, texts: list[str], cache_dir: Path | None) -> np.ndarray:
    if cache_dir is None:
        return embedder.embed(texts)
    digest = hashlib.sha256(embedder.model_name.encode())
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
    path = cache_dir / f"chunks-{digest.hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    vectors = embedder.embed(texts)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors, allow_pickle=False)
    return vectors


def dense_rankings(chunks: np.ndarray, queries: np.ndarray) -> list[Ranking]:
    index = faiss.IndexFlatIP(chunks.shape[1])
    index.add(chunks)
    scores, ids = index.search(queries, min(DEPTH, index.ntotal))
    return [[(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
            for row_ids, row_scores in zip(ids, scores, strict=True)]


def recall(rankings: list[Ranking], questions: list[Question], sources: list[str], k: int) -> float:
    hits = sum(q.source in {sources[i] for i, _ in ranking[:k]} for q, ranking in zip(questions, rankings, strict=True))
    return hits / len(questions)


def evaluate(modes: dict[str, list[Ranking]], questions: list[Question], sources: list[str]) -> dict[str, dict]:
    return {mode: {f"R@{k}": recall(rankings, questions, sources, k) for k in CUTOFFS}
            for mode, rankings in modes.items()}


def misses(rankings: list[Ranking], questions: list[Question], sources: list[str], k: int) -> list[str]:
    return [f"{q.source} <- {q.text!r} (got {sources[r[0][0]] if r else 'nothing'})"
            for q, r in zip(questions, rankings, strict=True) if q.source not in {sources[i] for i, _ in r[:k]}]


def markdown(results: dict[str, dict]) -> str:
    header = "| mode | " + " | ".join(f"R@{k}" for k in CUTOFFS) + " |"
    rule = "|---" * (len(CUTOFFS) + 1) + "|"
    rows = [f"| {mode} | " + " | ".join(f"{r[f'R@{k}']:.3f}" for k in CUTOFFS) + " |" for mode, r in results.items()]
    return "\n".join([header, rule, *rows])


def _convex(dense_weight: float) -> Callable[[Ranking, Ranking], Ranking]:
    return lambda d, s: fuse(d, s, DEPTH, dense_weight=dense_weight)


def timed_searches(index: LexicalIndex, questions: list[Question]) -> tuple[list[Ranking], float]:
    """BM25 rankings and the median search time in milliseconds."""
    rankings, seconds = [], []
    for question in questions:
        start = time.perf_counter()
        rankings.append(index.search(question.text, DEPTH))
        seconds.append(time.perf_counter() - start)
    return rankings, 1000 * float(np.median(seconds))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_to is not None:
        if not shutil.which("man") or not shutil.which("col"):
            raise SystemExit("rendering needs man and col (bsdextrautils)")
        render_pages(args.pages.read_text().split(), args.render_to)
        return 0
    questions = read_questions(args.questions)
    chunks = split_documents(load_directory(args.docs), SplitterConfig(chunk_size=750, chunk_overlap=150))
    texts = [chunk.page_content for chunk in chunks]
    sources = [chunk.metadata["source"] for chunk in chunks]
    unknown = sorted({q.source for q in questions} - set(sources))
    if unknown:
        raise SystemExit(f"questions cite files not in {args.docs}: {', '.join(unknown)}")

    embedder = TextEmbedder(EmbeddingConfig())
    embedder.load()
    dense = dense_rankings(embed_chunks(embedder, texts, args.cache_dir), embedder.embed([q.text for q in questions]))
    lexical_index = LexicalIndex.build(texts)
    lexical, search_ms = timed_searches(lexical_index, questions)

    fusions: dict[str, Callable[[Ranking, Ranking], Ranking]] = {
        "rrf": lambda d, s: fuse(d, s, DEPTH, method="rrf", dense_weight=0.5),
        "hybrid": lambda d, s: fuse(d, s, DEPTH),
    }
    if args.sweep:
        fusions |= {f"hybrid w={w:g}": _convex(w) for w in SWEEP}
    modes = {"dense": dense, "bm25": lexical,
             **{name: [f(d, s) for d, s in zip(dense, lexical, strict=True)] for name, f in fusions.items()}}
    results = evaluate(modes, questions, sources)
    print(f"{len(questions)} questions, {len(set(sources))} files, {len(texts)} chunks; "
          f"BM25 search median {search_ms:.2f} ms")
    print(markdown(results))
    if args.misses:
        for mode, rankings in modes.items():
            missed = misses(rankings, questions, sources, CUTOFFS[-1])
            print(f"\n{mode} misses at R@{CUTOFFS[-1]}:", *missed, sep="\n  ")
    if args.json is not None:
        report = {"questions": len(questions), "files": len(set(sources)), "chunks": len(texts),
                  "hit": "source file among the sources of the top-k chunks",
                  "bm25_search_median_ms": search_ms, "results": results}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
