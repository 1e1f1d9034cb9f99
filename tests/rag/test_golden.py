"""Golden sets: validated and bounded, stored beside the KB, scored on numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag.errors import InvalidRequestError
from rag.golden import (
    MAX_ITEMS,
    GoldenItem,
    ItemResult,
    check_items,
    files_not_in,
    item_result,
    parse_jsonl,
    read_items,
    score,
    write_items,
)


def test_items_are_validated_with_the_item_and_field_named() -> None:
    items = check_items([{"question": " How do I stop it? ", "files": ["operations.md"], "words": ["make stop"]}])
    assert items == [GoldenItem(question="How do I stop it?", files=["operations.md"], words=["make stop"])]
    for bad, where in [([{"question": "q"}], "item 1: files"), ([{"question": "", "files": ["a.md"]}], "question"),
                       ([{"question": "q", "files": ["a.md"], "extra": 1}], "extra"),
                       ({"question": "q"}, "a list")]:
        with pytest.raises(InvalidRequestError, match=where):
            check_items(bad)
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_ITEMS}"):
        check_items([{"question": "q", "files": ["a.md"]}] * (MAX_ITEMS + 1))


def test_the_set_is_stored_beside_the_kb_replaced_whole_and_removed_when_empty(tmp_path: Path) -> None:
    assert read_items(tmp_path, "samples") == []
    items = check_items([{"question": "如何升级？", "files": ["faq_zh.md"]}, {"question": "q", "files": ["a.md"]}])
    write_items(tmp_path, "samples", items)
    path = tmp_path / "samples" / "eval.jsonl"
    assert "如何升级" in path.read_text(encoding="utf-8") and read_items(tmp_path, "samples") == items
    write_items(tmp_path, "samples", [])
    assert not path.exists()
    with pytest.raises(InvalidRequestError, match="line 2 is not JSON"):
        parse_jsonl('{"question": "q", "files": ["a.md"]}\n{oops\n')


def test_scores_recall_mrr_citations_and_words() -> None:
    items = check_items([{"question": "a", "files": ["a.md"], "words": ["drain"]},
                         {"question": "b", "files": ["b.md"]},
                         {"question": "c", "files": ["c.md"]},
                         {"question": "d", "files": ["d.md"], "words": ["never"]}])
    docs = [{"metadata": {"source": s}} for s in ("a.md", "x.md", "b.md", "y.md", "z.md")]
    results = [item_result("ok", docs, "Drain first [1]."),  # rank 1, cited, has its words
               item_result("ok", docs, "See [2]."),  # rank 3, cites another file
               item_result("ok", [*docs[:1], {"metadata": {"source": "c.md"}}], "Only [2]."),  # rank 2, cited
               ItemResult("503")]  # failed: 0 on everything
    summary = score(items, results)
    assert summary["recall@1"] == 0.25 and summary["recall@3"] == 0.75 and summary["recall@5"] == 0.75
    assert summary["mrr"] == round((1 + 1 / 3 + 1 / 2) / 4, 4)
    assert summary["citation_rate"] == 0.5 and summary["words_rate"] == 0.5 and summary["words_items"] == 2
    assert summary["errors"] == 1


def test_golden_files_are_names_to_compare_not_paths_and_unknown_ones_are_reported() -> None:
    items = check_items([{"question": "q", "files": ["docs/cafe\u0301.md", "0"]}])  # nested, no type: kept
    assert items[0].files == ["docs/caf\u00e9.md", "0"]  # normalised as stored names are
    assert files_not_in(items, {"docs/caf\u00e9.md", "a.md"}) == ["0"]
