"""A lexical (BM25) index over chunk texts, with Chinese segmentation, and its fusion with dense results.

Dense embeddings miss exact tokens a user types: a flag (`--thin`), a resource name
(`dicom-stores`), an error code. BM25 catches those, and `fuse` merges both rankings.

Design:
- `tokenize` lower-cases, keeps runs of letters and digits (`--force` -> `force`, `sha256` stays whole,
  `c++` keeps its `++`) and segments CJK runs with jieba's search mode, which emits a long word and
  its parts (数据库 -> 数据, 数据库): a query may name the part where the document has the whole.
- The index is a term -> postings matrix in CSC form (column = term, rows = chunks) holding the BM25
  weight of each (chunk, term) pair, computed once at build or load. A query reads only its terms'
  columns and sums them, so query time grows with those postings, never with rebuilding anything
  (LangChain-Chatchat rebuilds its BM25 retriever on every query).
- Saved beside the FAISS index as `lexical.npz` (raw term counts in CSC arrays, chunk lengths and
  parameters; loaded with `allow_pickle=False`) plus `lexical_vocab.json` (terms in column order).
  Counts rather than weights are stored so build and load derive the weights by the same code.
- Row i is chunk id i, the same numbering as the FAISS index, so both rankings name the same chunks.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import unicodedata
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import scipy.sparse

FORMAT_VERSION = 1
DATA_FILE = "lexical.npz"
VOCAB_FILE = "lexical_vocab.json"

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# Letters and digits outside CJK (underscore splits words: `set_disk` -> set, disk); a trailing
# `++` or `#` stays on, so C++ and C# are not the letter c.
_TOKEN = re.compile(rf"(?P<cjk>[{_CJK}]+)|(?P<word>[^\W_{_CJK}]+(?:\+\+|#)?)")
# Some Chinese documents (older translations, text pulled from PDFs) put a space between every
# character; rejoined, jieba sees words again instead of single characters.
_SPACED_CJK = re.compile(rf"(?<=[{_CJK}])[ \t\u3000](?=[{_CJK}])")

# Words so common that they only add postings to read; kept short, since BM25's idf already
# discounts frequent terms and a longer list starts dropping meaning ("not", "no", "all").
_STOP_WORDS_TEXT = """
a an and are as at be by can do does for from how i if in into is it its me my of on or so that the
their them then there these this those to was we were what when where which who why will with you your
的 了 是 在 和 与 及 或 也 就 都 而 把 被 吗 呢 吧 啊 着 过 之 其 这 那 个 我 你 他 它 我们 什么 怎么 如何
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())

_jieba: ModuleType | None = None
_jieba_lock = threading.Lock()


def _segmenter() -> ModuleType:
    """jieba, imported and its dictionary loaded once: both are slow, and two threads must not race."""
    global _jieba
    if _jieba is None:
        with _jieba_lock:
            if _jieba is None:
                import jieba

                jieba.setLogLevel(logging.WARNING)  # it logs the dictionary load at INFO/DEBUG
                jieba.initialize()
                _jieba = jieba
    return _jieba


def tokenize(text: str) -> list[str]:
    """Index terms of `text`, in order: lower-cased words and jieba-segmented CJK words, no stop words."""
    # NFKC folds full-width Latin letters and digits, common in Chinese text, to ASCII.
    text = _SPACED_CJK.sub("", unicodedata.normalize("NFKC", text).lower())
    tokens: list[str] = []
    for match in _TOKEN.finditer(text):
        if match.lastgroup == "cjk":
            tokens += _segmenter().lcut_for_search(match.group())
        else:
            tokens.append(match.group())
    return [token for token in tokens if token not in STOP_WORDS]


class LexicalIndex:
    """Okapi BM25 over chunks; row i of the postings is chunk id i."""

    def __init__(self, vocabulary: list[str], counts: scipy.sparse.csc_matrix, *,
                 k1: float = 1.2, b: float = 0.75) -> None:
        # k1 = 1.2, b = 0.75: the usual Okapi defaults; chunks are of similar length, so b matters little.
        self.vocabulary = vocabulary
        self.k1, self.b = k1, b
        self._term_ids = {term: i for i, term in enumerate(vocabulary)}
        self._counts = counts
        self._lengths = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        self._weights = self._bm25_weights()

    @classmethod
    def build(cls, texts: list[str], **params: float) -> LexicalIndex:
        """The index of `texts`, chunk id i = texts[i]."""
        bags = [Counter(tokenize(text)) for text in texts]  # once each: jieba is the slow part of a build
        vocabulary = sorted(set().union(*bags))
        term_ids = {term: i for i, term in enumerate(vocabulary)}
        rows: list[int] = []
        columns: list[int] = []
        values: list[int] = []
        for row, bag in enumerate(bags):
            for term, count in bag.items():
                rows.append(row)
                columns.append(term_ids[term])
                values.append(count)
        coordinates = (np.asarray(rows, dtype=np.int32), np.asarray(columns, dtype=np.int32))
        counts = scipy.sparse.csc_matrix((np.asarray(values, dtype=np.int32), coordinates),
                                         shape=(len(texts), len(vocabulary)), dtype=np.int32)
        return cls(vocabulary, counts, **params)

    @property
    def count(self) -> int:
        """Number of chunks indexed."""
        return int(self._counts.shape[0])

    def _bm25_weights(self) -> scipy.sparse.csc_matrix:
        counts = self._counts
        documents = max(self.count, 1)
        frequency = np.diff(counts.indptr)  # chunks containing each term
        # Lucene's idf variant: never negative, so a term in most chunks still counts a little.
        idf = np.log1p((documents - frequency + 0.5) / (frequency + 0.5))
        average = float(self._lengths.mean()) if self.count else 1.0
        tf = counts.data.astype(np.float64)
        norm = self.k1 * (1 - self.b + self.b * self._lengths[counts.indices] / max(average, 1e-9))
        per_term = np.repeat(idf, frequency)  # the column of each stored value, in CSC order
        data = (per_term * tf * (self.k1 + 1) / (tf + norm)).astype(np.float32)
        return scipy.sparse.csc_matrix((data, counts.indices, counts.indptr), shape=counts.shape)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """Up to `k` (chunk id, BM25 score) pairs, best first, only chunks sharing a term with the query."""
        columns = sorted({self._term_ids[t] for t in tokenize(query) if t in self._term_ids})
        if k <= 0 or not columns:
            return []
        weights = self._weights
        spans = [slice(weights.indptr[c], weights.indptr[c + 1]) for c in columns]
        rows = np.concatenate([weights.indices[span] for span in spans])
        values = np.concatenate([weights.data[span] for span in spans]).astype(np.float64)
        # Sum per chunk over the touched rows only, so the cost follows the postings read.
        touched, position = np.unique(rows, return_inverse=True)
        scores = np.bincount(position, weights=values)
        best = np.lexsort((touched, -scores))[:k]  # ties broken by chunk id, for stable results
        return [(int(touched[i]), float(scores[i])) for i in best if scores[i] > 0]

    @staticmethod
    def exists(directory: Path) -> bool:
        return (Path(directory) / DATA_FILE).is_file() and (Path(directory) / VOCAB_FILE).is_file()

    def save(self, directory: Path) -> None:
        """Write the two files into `directory` (the caller stages and publishes it)."""
        directory = Path(directory)
        counts = self._counts
        np.savez(directory / DATA_FILE, format_version=np.int64(FORMAT_VERSION),
                 shape=np.asarray(counts.shape, dtype=np.int64), indptr=counts.indptr.astype(np.int64),
                 indices=counts.indices.astype(np.int32), counts=counts.data.astype(np.int32),
                 params=np.asarray([self.k1, self.b], dtype=np.float64))
        (directory / VOCAB_FILE).write_text(json.dumps(self.vocabulary, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        """The index saved in `directory`; ValueError if the files are inconsistent or of another format."""
        directory = Path(directory)
        with np.load(directory / DATA_FILE, allow_pickle=False) as data:
            arrays: dict[str, Any] = {name: data[name] for name in data.files}
        vocabulary = json.loads((directory / VOCAB_FILE).read_text(encoding="utf-8"))
        _check_saved(arrays, vocabulary)
        rows, columns = (int(n) for n in arrays["shape"])
        counts = scipy.sparse.csc_matrix((arrays["counts"], arrays["indices"], arrays["indptr"]),
                                         shape=(rows, columns), dtype=np.int32)
        k1, b = (float(p) for p in arrays["params"])
        return cls(vocabulary, counts, k1=k1, b=b)


def _check_saved(arrays: dict[str, Any], vocabulary: Any) -> None:
    # A truncated or mismatched pair of files must fail at load, not give wrong scores at query time.
    if int(arrays["format_version"]) != FORMAT_VERSION:
        raise ValueError(f"lexical index format {int(arrays['format_version'])}, expected {FORMAT_VERSION}")
    rows, columns = (int(n) for n in arrays["shape"])
    indptr, indices = arrays["indptr"], arrays["indices"]
    if not isinstance(vocabulary, list) or len(vocabulary) != columns or len(indptr) != columns + 1:
        raise ValueError("lexical index vocabulary does not match its postings")
    if int(indptr[-1]) != len(indices) or len(indices) != len(arrays["counts"]) or \
            (len(indices) and not 0 <= int(indices.min()) <= int(indices.max()) < rows):
        raise ValueError("lexical index postings are inconsistent")


def fuse(dense: list[tuple[int, float]], lexical: list[tuple[int, float]], k: int, *,
         dense_weight: float = 0.75, method: Literal["convex", "rrf"] = "convex",
         rrf_k: int = 60) -> list[tuple[int, float]]:
    """The best `k` chunk ids of a dense and a lexical ranking (each best first), with fused scores.

    A chunk scores `dense_weight * d + (1 - dense_weight) * l`, where d and l are its parts from each
    ranking (0 where it is absent): with method "convex", its score min-max normalised over that
    ranking's candidates (best 1, worst 0); with "rrf", its reciprocal rank 1 / (rrf_k + rank), so
    `method="rrf", dense_weight=0.5` is plain reciprocal rank fusion. Ties go to the lower chunk id.

    Why the defaults: on the man-page evaluation (scripts/eval_retrieval.py) dense search alone is
    the better first hit and BM25 the better rescuer of pages dense misses. Equal-weight RRF gave up
    R@1 for R@5; the convex mix keeps dense's R@1 and reaches R@5 = 1 for any dense_weight in
    0.65-0.95 at 10-50 candidates per ranking. 0.75 sits near the low end of that plateau, leaving
    BM25 as much say as costs nothing: an exact-term match (a flag, an id) can still lift a chunk
    that dense ranks lower. Normalised scores, unlike ranks, keep how much better the best hit is
    (Bruch et al., "An Analysis of Fusion Functions for Hybrid Retrieval", 2023).
    """
    part = _reciprocal_ranks if method == "rrf" else _min_max
    fused: dict[int, float] = {}
    for ranking, weight in ((dense, dense_weight), (lexical, 1.0 - dense_weight)):
        for chunk, value in part(ranking, rrf_k).items():
            fused[chunk] = fused.get(chunk, 0.0) + weight * value
    best = sorted(fused.items(), key=lambda item: (-item[1], item[0]))
    return best[:max(k, 0)]


def _reciprocal_ranks(ranking: list[tuple[int, float]], rrf_k: int) -> dict[int, float]:
    return {chunk: 1.0 / (rrf_k + rank) for rank, (chunk, _score) in enumerate(ranking, start=1)}


def _min_max(ranking: list[tuple[int, float]], _rrf_k: int) -> dict[int, float]:
    # Cosine and BM25 live on different scales; rescaled over the candidates, each says only how
    # close a chunk comes to that ranking's best. One candidate, or all equal, are each the best.
    if not ranking:
        return {}
    scores = [score for _chunk, score in ranking]
    low, high = min(scores), max(scores)
    return {chunk: (score - low) / (high - low) if high > low else 1.0 for chunk, score in ranking}
