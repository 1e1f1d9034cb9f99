"""BM25 index, tokenisation and rank fusion (rag.lexical)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from rag.lexical import DATA_FILE, VOCAB_FILE, LexicalIndex, fuse, tokenize

DOCS = [
    "The ar program creates, modifies and extracts from archives.",
    "Use tar to create archives and extract files from archives.",
    "zstd compresses files; use --long for long distance matching on archives.",
    "向量数据库的索引可以加速相似度检索。",
    "知识库问答服务把文档切分成段落。",
]


@pytest.fixture(scope="module")
def index() -> LexicalIndex:
    return LexicalIndex.build(DOCS)


def test_tokenize_english_lowercases_splits_punctuation_and_drops_stop_words() -> None:
    assert tokenize("How do I use --force with SHA256 and C++?") == ["use", "force", "sha256", "c++"]


def test_tokenize_segments_chinese_into_words() -> None:
    tokens = tokenize("向量数据库的索引")
    assert {"向量", "数据库", "索引"} <= set(tokens)
    assert "的" not in tokens
    assert any(len(token) > 1 for token in tokens)


def test_tokenize_mixed_and_full_width_text() -> None:
    assert {"gpu", "显存", "不足"} <= set(tokenize("ＧＰＵ显存不足"))


def test_tokenize_is_deterministic_across_threads() -> None:
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(tokenize("中华人民共和国的向量检索"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(result == results[0] for result in results)


def test_rare_term_ranks_its_document_first(index: LexicalIndex) -> None:
    # "archives" is in three documents, "zstd" in one: the rare term decides the order.
    hits = index.search("zstd archives", 3)
    assert hits[0][0] == 2
    assert [score for _, score in hits] == sorted((score for _, score in hits), reverse=True)
    assert {chunk for chunk, _ in hits} == {0, 1, 2}


def test_search_respects_k_and_returns_only_matching_chunks(index: LexicalIndex) -> None:
    assert len(index.search("archives", 2)) == 2
    assert {chunk for chunk, _ in index.search("archives", 10)} == {0, 1, 2}
    assert index.search("archives", 0) == []


@pytest.mark.parametrize("query", ["", "   ", "the of and", "kubernetes", "的了是"])
def test_query_without_known_terms_returns_nothing(index: LexicalIndex, query: str) -> None:
    assert index.search(query, 5) == []


def test_chinese_query_finds_chinese_document(index: LexicalIndex) -> None:
    assert index.search("如何建立向量索引", 5)[0][0] == 3
    assert index.search("知识库", 5)[0][0] == 4


def test_count(index: LexicalIndex) -> None:
    assert index.count == len(DOCS)
    assert LexicalIndex.build([]).count == 0
    assert LexicalIndex.build([]).search("anything", 3) == []


def test_save_load_round_trip_gives_identical_results(index: LexicalIndex, tmp_path: Path) -> None:
    assert not LexicalIndex.exists(tmp_path)
    index.save(tmp_path)
    assert LexicalIndex.exists(tmp_path)
    loaded = LexicalIndex.load(tmp_path)
    assert loaded.count == index.count
    for query in ["zstd archives", "extract files", "向量检索", "知识库 文档"]:
        assert loaded.search(query, 5) == index.search(query, 5)


def test_saved_files_hold_no_pickle(index: LexicalIndex, tmp_path: Path) -> None:
    index.save(tmp_path)
    with np.load(tmp_path / DATA_FILE, allow_pickle=False) as data:
        assert all(data[name].dtype != object for name in data.files)
    assert isinstance(json.loads((tmp_path / VOCAB_FILE).read_text(encoding="utf-8")), list)


def test_load_refuses_mismatched_vocabulary(index: LexicalIndex, tmp_path: Path) -> None:
    index.save(tmp_path)
    (tmp_path / VOCAB_FILE).write_text(json.dumps(index.vocabulary[:-1]), encoding="utf-8")
    with pytest.raises(ValueError, match="vocabulary"):
        LexicalIndex.load(tmp_path)


@pytest.mark.parametrize(("method", "dense_weight"), [("convex", 0.75), ("rrf", 0.5)])
def test_fuse_puts_an_id_found_by_both_ahead_of_ids_found_by_one(method: Literal["convex", "rrf"],
                                                                  dense_weight: float) -> None:
    dense = [(1, 0.90), (2, 0.85), (3, 0.50)]
    lexical = [(4, 10.0), (2, 9.0), (5, 2.0)]
    fused = fuse(dense, lexical, 5, method=method, dense_weight=dense_weight)
    assert fused[0][0] == 2
    assert {chunk for chunk, _ in fused} == {1, 2, 3, 4, 5}
    assert [score for _, score in fused] == sorted((score for _, score in fused), reverse=True)


def test_fuse_default_keeps_dense_first_hit_over_a_lexical_only_one() -> None:
    fused = fuse([(1, 0.60), (2, 0.50), (3, 0.40)], [(7, 20.0), (8, 10.0), (9, 1.0)], 6)
    assert [chunk for chunk, _ in fused][:2] == [1, 2]


def test_fuse_default_lets_lexical_lift_a_close_dense_runner_up() -> None:
    fused = fuse([(1, 0.60), (2, 0.59), (3, 0.40)], [(2, 10.0), (9, 9.0), (8, 1.0)], 3)
    assert fused[0][0] == 2


def test_fuse_with_one_ranking_keeps_its_order() -> None:
    dense = [(5, 0.9), (3, 0.8), (4, 0.8), (1, 0.2)]
    assert [chunk for chunk, _ in fuse(dense, [], 10)] == [5, 3, 4, 1]
    assert [chunk for chunk, _ in fuse([], [(6, 3.0)], 10)] == [6]


def test_fuse_respects_k() -> None:
    dense = [(i, 1.0 - i / 100) for i in range(20)]
    lexical = [(i, 50.0 - i) for i in range(10, 30)]
    assert len(fuse(dense, lexical, 5)) == 5
    assert len(fuse(dense, lexical, 5, method="rrf")) == 5
    assert fuse(dense, lexical, 0) == []
    assert len(fuse(dense[:2], [], 5)) == 2
    assert fuse([], [], 3) == []
