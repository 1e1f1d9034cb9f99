"""Retrieval recall of dense, BM25 and fused search on folders of documents and their question sets.

    python -m scripts.eval_retrieval --render-to /tmp/heldout     # once: render the man pages
    python -m scripts.eval_retrieval --docs /tmp/heldout --json /tmp/eval.json --cache-dir /tmp/eval-cache

    # English, Chinese, and both folders indexed together (each question set against the mixed corpus)
    python -m scripts.eval_retrieval --render-to /tmp/heldout --render-zh-to /tmp/heldout_zh
    python -m scripts.eval_retrieval --cache-dir /tmp/eval-cache --combined \
        --docs /tmp/heldout --questions data/eval/manpages_questions.jsonl \
        --docs /tmp/heldout_zh --questions data/eval/manpages_zh_questions.jsonl

The man-page corpora are not committed (licences, size): `data/eval/manpages.txt` lists the 200 page
stems, and `--render-to DIR` renders each from /usr/share/man as
`MANWIDTH=100 man -P cat -l /usr/share/man/manN/STEM.N.gz | col -b > DIR/STEM.txt` (the same
pages from another distribution release differ a little, and so may the numbers).
`data/eval/manpages_zh.txt` lists 30 Chinese pages (zh_CN and zh_TW, paths under /usr/share/man;
the file says how they were chosen), and `--render-zh-to DIR` renders each the same way, in a
C.UTF-8 locale, as DIR/NAME.SECTION.txt (passwd.1 and passwd.5 are both there).
Its 30 questions (`data/eval/manpages_zh_questions.jsonl`) describe a task without naming the
command; the 8 about zh_TW pages are written in traditional characters, the 22 others in simplified.

Questions are JSON lines `{"question": ..., "source": "<file name relative to --docs>"}`; nothing
assumes English. `--docs` and `--questions` may be repeated (paired in order): each pair gets its
own table, and `--combined` adds one table per question set searched in all folders at once (a
bilingual knowledge base), sources named FOLDER/FILE there.

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
from rag.language import choose_mode, cjk_share, language_of
from rag.lexical import LexicalIndex, fuse

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGE_LIST = REPO_ROOT / "data" / "eval" / "manpages.txt"
QUESTIONS = REPO_ROOT / "data" / "eval" / "manpages_questions.jsonl"
MAN_ROOT = Path("/usr/share/man")
DEPTH = 50  # candidates taken from each retriever before fusion
ZH_PAGE_LIST = REPO_ROOT / "data" / "eval" / "manpages_zh.txt"
DEFAULT_DOCS = Path("/tmp/heldout")
CUTOFFS = (1, 3, 5)
SWEEP = (0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

Ranking = list[tuple[int, float]]


@dataclass(frozen=True)
class Question:
    text: str
    source: str


@dataclass(frozen=True)
class Corpus:
    """One folder's chunks, their embeddings, and the question set asked of it."""

    name: str
    questions: list[Question]
    texts: list[str]
    sources: list[str]
    vectors: np.ndarray


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=Path, action="append", default=None,
                        help=f"folder of documents; repeat for several sets (default {DEFAULT_DOCS})")
    parser.add_argument("--questions", type=Path, action="append", default=None,
                        help="JSON lines of question and source, one per --docs, in the same order "
                             "(may be left out with a single --docs: the English man-page questions)")
    parser.add_argument("--combined", action="store_true",
                        help="also index all --docs folders together and ask each question set of that")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--runtime", action="append", default=None, choices=["auto", "openvino", "onnx", "torch",
                                                                               "onnx-int8"],
                        help="embedding runtime; repeat to compare runtimes side by side (the first is the "
                             "reference of the comparison table; default: auto)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep chunk embeddings here, keyed by a hash of the chunks (a dev convenience)")
    parser.add_argument("--render-to", type=Path, default=None,
                        help="render the pages listed in --pages into this folder and exit")
    parser.add_argument("--pages", type=Path, default=PAGE_LIST, help="man page stems to render")
    parser.add_argument("--render-zh-to", type=Path, default=None,
                        help="render the Chinese pages listed in --zh-pages into this folder and exit")
    parser.add_argument("--zh-pages", type=Path, default=ZH_PAGE_LIST,
                        help="Chinese man pages to render, as paths under /usr/share/man without .gz")
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


def render_localized_pages(entries: list[str], target: Path) -> None:
    """Render pages given by path under MAN_ROOT (e.g. zh_CN/man1/chsh.1) to NAME.SECTION.txt, as UTF-8."""
    names = [Path(entry).name for entry in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SystemExit(f"pages listed twice under one name: {', '.join(repeated)}")
    target.mkdir(parents=True, exist_ok=True)
    # man picks the output encoding from the locale: C.UTF-8 whatever the caller's.
    environment = {**os.environ, "MANWIDTH": "100", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    for entry, name in zip(entries, names, strict=True):
        found = [path for path in (MAN_ROOT / f"{entry}.gz", MAN_ROOT / entry) if path.is_file()]
        if not found:
            raise SystemExit(f"no man page {entry!r} under {MAN_ROOT}")
        page = subprocess.run(["man", "-P", "cat", "-l", str(found[0])], env=environment,
                              capture_output=True, check=True).stdout
        plain = subprocess.run(["col", "-b"], input=page, env=environment, capture_output=True, check=True).stdout
        try:
            plain.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SystemExit(f"{entry} did not render as UTF-8: {error}") from None
        (target / f"{name}.txt").write_bytes(plain)


def page_list(path: Path) -> list[str]:
    """Whitespace-separated entries of a page list, ignoring # comments."""
    return [word for line in path.read_text(encoding="utf-8").splitlines() for word in line.split("#")[0].split()]


def read_questions(path: Path) -> list[Question]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Question(line["question"], line["source"]) for line in lines]


def embed_chunks(embedder: TextEmbedder, texts: list[str], cache_dir: Path | None) -> np.ndarray:
    if cache_dir is None:
        return embedder.embed(texts)
    how = embedder.describe()  # vectors differ by runtime and precision a little: never reused across them
    digest = hashlib.sha256(f"{embedder.model_name} {how['runtime']} {how['precision']}".encode())
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


def fused_modes(dense: list[Ranking], lexical: list[Ranking], sweep: bool) -> dict[str, list[Ranking]]:
    """Each retrieval mode's rankings of the questions, from their dense and BM25 rankings."""
    fusions: dict[str, Callable[[Ranking, Ranking], Ranking]] = {
        "rrf": lambda d, s: fuse(d, s, DEPTH, method="rrf", dense_weight=0.5),
        "hybrid": lambda d, s: fuse(d, s, DEPTH),  # the service's default, dense_weight 0.75
        "hybrid w=0.5": _convex(0.5),
        "hybrid w=0.25": _convex(0.25),
        # BM25's order; dense-only candidates follow with score 0 (in chunk-id order, not dense order).
        "lexical-led": _convex(0.0),
    }
    if sweep:
        fusions |= {f"hybrid w={w:g}": _convex(w) for w in SWEEP if f"hybrid w={w:g}" not in fusions}
    return {"dense": dense, "bm25": lexical,
            **{name: [f(d, s) for d, s in zip(dense, lexical, strict=True)] for name, f in fusions.items()}}


def auto_rankings(dense: list[Ranking], lexical: list[Ranking], questions: list[Question],
                  texts: list[str]) -> list[Ranking]:
    """What the service's default `retrieval.mode: auto` does per question (rag.language.choose_mode with
    the bundled model's languages): fused where the model covers the text, else BM25 first, then dense."""
    kb_language = language_of(cjk_share(texts))
    rankings = []
    for d, s, question in zip(dense, lexical, questions, strict=True):
        choice = choose_mode("auto", EmbeddingConfig().languages, kb_language, language_of(cjk_share(question.text)))
        if choice.mode == "lexical":
            found = {chunk for chunk, _ in s}
            rankings.append((s + [pair for pair in d if pair[0] not in found])[:DEPTH])
        else:
            rankings.append(fuse(d, s, DEPTH))
    return rankings


def load_corpus(name: str, docs: Path, questions_path: Path, embedder: TextEmbedder,
                cache_dir: Path | None) -> Corpus:
    questions = read_questions(questions_path)
    chunks = split_documents(load_directory(docs), SplitterConfig(chunk_size=750, chunk_overlap=150))
    texts = [chunk.page_content for chunk in chunks]
    sources = [chunk.metadata["source"] for chunk in chunks]
    unknown = sorted({q.source for q in questions} - set(sources))
    if unknown:
        raise SystemExit(f"questions cite files not in {docs}: {', '.join(unknown)}")
    return Corpus(name, questions, texts, sources, embed_chunks(embedder, texts, cache_dir))


def combine(corpora: list[Corpus]) -> list[Corpus]:
    """Each question set against the chunks of all folders together, sources named FOLDER/FILE."""
    texts = [text for corpus in corpora for text in corpus.texts]
    sources = [f"{corpus.name}/{source}" for corpus in corpora for source in corpus.sources]
    vectors = np.vstack([corpus.vectors for corpus in corpora])
    return [Corpus(f"{corpus.name} in {'+'.join(c.name for c in corpora)}",
                   [Question(q.text, f"{corpus.name}/{q.source}") for q in corpus.questions],
                   texts, sources, vectors) for corpus in corpora]


def run_table(corpus: Corpus, embedder: TextEmbedder, lexical_index: LexicalIndex, args: argparse.Namespace) -> dict:
    questions, sources = corpus.questions, corpus.sources
    dense = dense_rankings(corpus.vectors, embedder.embed_queries([q.text for q in questions]))
    lexical, search_ms = timed_searches(lexical_index, questions)
    modes = {"auto (default)": auto_rankings(dense, lexical, questions, corpus.texts),
             **fused_modes(dense, lexical, args.sweep)}
    results = evaluate(modes, questions, sources)
    print(f"\n## {corpus.name}: {len(questions)} questions, {len(set(sources))} files, {len(corpus.texts)} chunks; "
          f"BM25 search median {search_ms:.2f} ms")
    print(markdown(results))
    if args.misses:
        for mode, rankings in modes.items():
            missed = misses(rankings, questions, sources, CUTOFFS[-1])
            print(f"\n{mode} misses at R@{CUTOFFS[-1]}:", *missed, sep="\n  ")
    return {"name": corpus.name, "questions": len(questions), "files": len(set(sources)), "chunks": len(corpus.texts),
            "bm25_search_median_ms": search_ms, "results": results}


def run_runtime(runtime: str, names: list[str], folders: list[Path], question_files: list[Path],
                args: argparse.Namespace) -> list[dict]:
    """Every table of the run with one embedding runtime."""
    settings = {"runtime": "onnx", "quantization": "int8"} if runtime == "onnx-int8" else {"runtime": runtime}
    embedder = TextEmbedder(EmbeddingConfig(**settings))  # type: ignore[arg-type]
    embedder.load()
    how = embedder.describe()
    print(f"\n# embedding runtime {runtime}: {how['runtime']}, {how['precision']}")
    corpora = [load_corpus(name, folder, question_file, embedder, args.cache_dir)
               for name, folder, question_file in zip(names, folders, question_files, strict=True)]
    tables = [run_table(corpus, embedder, LexicalIndex.build(corpus.texts), args) for corpus in corpora]
    if args.combined:
        mixed = combine(corpora)
        lexical_index = LexicalIndex.build(mixed[0].texts)  # one index: every set shares the chunks
        tables += [run_table(corpus, embedder, lexical_index, args) for corpus in mixed]
    embedder.close()
    return tables


def compare_runtimes(per_runtime: dict[str, list[dict]]) -> str:
    """Dense and auto recall of each runtime beside the first's, table by table: the largest difference
    says whether a runtime changes what questions find."""
    reference = next(iter(per_runtime))
    lines = ["\n# runtimes side by side (dense and auto (default) recall; difference to " + reference + ")",
             "| table | mode | " + " | ".join(per_runtime) + " | largest difference |",
             "|---|---|" + "---:|" * (len(per_runtime) + 1)]
    for n, table in enumerate(per_runtime[reference]):
        for mode in ("dense", "auto (default)"):
            for k in CUTOFFS:
                values = [tables[n]["results"][mode][f"R@{k}"] for tables in per_runtime.values()]
                worst = max(abs(v - values[0]) for v in values)
                lines.append(f"| {table['name']} | {mode} R@{k} | " + " | ".join(f"{v:.3f}" for v in values) +
                             f" | {worst:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_to is not None or args.render_zh_to is not None:
        if not shutil.which("man") or not shutil.which("col"):
            raise SystemExit("rendering needs man and col (bsdextrautils)")
        if args.render_to is not None:
            render_pages(page_list(args.pages), args.render_to)
        if args.render_zh_to is not None:
            render_localized_pages(page_list(args.zh_pages), args.render_zh_to)
        return 0
    folders = args.docs or [DEFAULT_DOCS]
    question_files = args.questions or ([QUESTIONS] if len(folders) == 1 else [])
    if len(question_files) != len(folders):
        raise SystemExit(f"{len(folders)} --docs but {len(question_files)} --questions: give one per folder")
    names = [folder.resolve().name or str(folder) for folder in folders]
    if len(set(names)) != len(names):
        raise SystemExit(f"--docs folders need distinct names: {', '.join(names)}")
    if args.combined and len(folders) < 2:
        raise SystemExit("--combined needs at least two --docs folders")

    per_runtime = {runtime: run_runtime(runtime, names, folders, question_files, args)
                   for runtime in args.runtime or ["auto"]}
    if len(per_runtime) > 1:
        print(compare_runtimes(per_runtime))
    tables = next(iter(per_runtime.values()))
    if args.json is not None:
        report: dict = {"hit": "source file among the sources of the top-k chunks", "tables": tables}
        if len(tables) == 1:  # the single-set layout of earlier reports
            report |= {key: tables[0][key] for key in ("questions", "files", "chunks", "bm25_search_median_ms",
                                                       "results")}
        if len(per_runtime) > 1:
            report["runtimes"] = per_runtime
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
