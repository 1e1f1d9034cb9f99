"""Golden sets: a knowledge base's evaluation questions, each with the file(s) that should answer it and,
optionally, words the answer should contain. Stored beside the KB as `<kb_root>/<kb>/eval.jsonl` (one
JSON object per line, so a team can keep it in git and diff it), and scored the same way by
`scripts.evaluate` and by a rollout, which compares a candidate's scores with the stable version's.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from rag import kb_store
from rag.api import NOT_BLANK
from rag.errors import InvalidRequestError
from rag.kb_versions import kb_directory
from rag.records import Passage
from rag.shadow import cited_sources

EVAL_FILE = "eval.jsonl"
MAX_ITEMS = 500
RECALL_AT = (1, 3, 5)
MEASURES = (*(f"recall@{k}" for k in RECALL_AT), "mrr", "citation_rate", "words_rate")
EVAL_TOP_K = max(RECALL_AT)  # the evaluation asks for this many passages, so recall@5 is measured

# Not blank, as the schema says (a pattern), not only once stripped: a client reading /openapi.json knows.
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=NOT_BLANK)]


class GoldenItem(BaseModel):
    """One evaluation question."""

    model_config = ConfigDict(extra="forbid", frozen=True, regex_engine="python-re")

    question: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4000,
                                               pattern=NOT_BLANK)]
    files: list[Text] = Field(min_length=1, max_length=20, description="documents of the KB that answer it")
    words: list[Text] = Field(default_factory=list, max_length=20,
                              description="words the answer should contain (case-insensitive)")


def check_items(raw: Any) -> list[GoldenItem]:
    """Validated items, or one `InvalidRequestError` naming the first bad item and field."""
    if not isinstance(raw, list):
        raise InvalidRequestError(f"an evaluation set is a list of items, got {type(raw).__name__}")
    if len(raw) > MAX_ITEMS:
        raise InvalidRequestError(f"an evaluation set holds at most {MAX_ITEMS} items, got {len(raw)}")
    items = []
    for number, value in enumerate(raw, 1):
        try:
            item = GoldenItem.model_validate(value)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"]) or "(item)"
            raise InvalidRequestError(f"evaluation item {number}: {where}: {problem['msg']}") from None
        # Names compared with the sources an answer cites, never opened: normalised as stored names are,
        # not refused (a name that is no file of the KB is reported by whoever knows the KB's files).
        files = [unicodedata.normalize("NFC", f) for f in item.files]
        items.append(item.model_copy(update={"files": files}))
    return items


def files_not_in(items: Sequence[GoldenItem], stored: set[str]) -> list[str]:
    """The files the items name that the knowledge base does not hold (a typo, or a file deleted since)."""
    return sorted({f for item in items for f in item.files} - stored)


def parse_jsonl(text: str) -> list[GoldenItem]:
    raw = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                raw.append(json.loads(line))
            except ValueError as exc:
                raise InvalidRequestError(f"evaluation set line {number} is not JSON: {exc}") from None
    return check_items(raw)


def dump_jsonl(items: Sequence[GoldenItem]) -> str:
    return "".join(json.dumps(i.model_dump(exclude_defaults=True), ensure_ascii=False) + "\n" for i in items)


def eval_path(kb_root: Path, kb: str) -> Path:
    return kb_directory(kb_root, kb) / EVAL_FILE


def read_items(kb_root: Path, kb: str) -> list[GoldenItem]:
    """The KB's evaluation set; empty when it has none."""
    path = eval_path(kb_root, kb)
    return parse_jsonl(path.read_text(encoding="utf-8")) if path.is_file() else []


def write_items(kb_root: Path, kb: str, items: Sequence[GoldenItem]) -> None:
    """Replace the set at once (readers see the old set or the new one); an empty list removes it."""
    path = eval_path(kb_root, kb)
    if items:
        kb_store.write_atomically(path, dump_jsonl(items).encode("utf-8"))
    else:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class ItemResult:
    """A version's answer to one golden question."""

    status: str  # "ok", or the HTTP status / transport error
    sources: list[str] = field(default_factory=list)  # the answer's source files in rank order, each once
    cited: frozenset[str] = frozenset()
    text: str = ""


def item_result(status: str, docs: Sequence[dict[str, Any]], text: str) -> ItemResult:
    """From an answer's `docs` / `sources` (Chatchat's document shape: `metadata.source`) and its text."""
    passages = [Passage(i, "", str((d.get("metadata") or {}).get("source", "")), 0.0) for i, d in enumerate(docs)]
    return ItemResult(status, list(dict.fromkeys(p.source for p in passages)), cited_sources(text, passages), text)


def score(items: Sequence[GoldenItem], results: Sequence[ItemResult]) -> dict[str, Any]:
    """recall@1/3/5 (an expected file among the first k sources), MRR, the share of answers that cite an
    expected file, and (over the items that name words) the share that contain all of them. A question
    the version failed scores 0 on every measure."""
    if len(items) != len(results):
        raise ValueError(f"{len(items)} items but {len(results)} results")
    n = len(items)
    ranks = [_first_rank(i, r) for i, r in zip(items, results, strict=True)]
    cited = [r.status == "ok" and bool(set(i.files) & r.cited) for i, r in zip(items, results, strict=True)]
    worded = [(i, r) for i, r in zip(items, results, strict=True) if i.words]
    summary: dict[str, Any] = {"items": n, "errors": sum(1 for r in results if r.status != "ok"),
                               **{f"recall@{k}": _share(sum(1 for rank in ranks if rank and rank <= k), n)
                                  for k in RECALL_AT},
                               "mrr": round(sum(1 / rank for rank in ranks if rank) / n, 4) if n else None,
                               "citation_rate": _share(sum(cited), n),
                               "words_rate": _share(sum(1 for i, r in worded if _has_words(i, r)), len(worded)),
                               "words_items": len(worded)}
    return summary


def _first_rank(item: GoldenItem, result: ItemResult) -> int | None:
    if result.status != "ok":
        return None
    return next((rank for rank, source in enumerate(result.sources, 1) if source in item.files), None)


def _has_words(item: GoldenItem, result: ItemResult) -> bool:
    text = result.text.casefold()
    return result.status == "ok" and all(w.casefold() in text for w in item.words)


def _share(count: int, total: int) -> float | None:
    return round(count / total, 4) if total else None
