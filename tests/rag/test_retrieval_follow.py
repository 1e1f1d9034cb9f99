"""A Retriever follows new index versions live: swaps under running searches, discovery, bad versions, leases."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rag.config import RetrievalConfig
from rag.errors import InvalidRequestError, KnowledgeBaseNotFoundError
from rag.index import Chunk, KnowledgeBaseIndex, publish_index
from rag.leases import READERS_DIR, prune_versions, versions_in_use
from rag.retrieval import RETRY_MAX_S, Retriever

DIM = 8
QUERY = np.full(DIM, DIM ** -0.5, dtype=np.float32)


def _publish(root: Path, kb: str, tag: str, model: str = "m") -> int:
    """A tiny version of `kb` whose passages all come from source `<tag>.md`; returns its number."""
    rng = np.random.default_rng(abs(hash((kb, tag))) % 2**32)
    vectors = rng.normal(size=(4, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk(f"{tag} passage {i}", f"{tag}.md") for i in range(4)]
    return publish_index(root, kb, chunks, vectors, embedding_model=model, fingerprint="x").version


def _source(retriever: Retriever, kb: str) -> str:
    return retriever.search(kb, QUERY, top_k=1, score_threshold=-1)[0].source


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    made: list[Retriever] = []

    def build(knowledge_bases: dict[str, int | str], **settings: Any) -> Retriever:
        clock = settings.pop("clock", _Clock())
        config = RetrievalConfig(kb_root=tmp_path, knowledge_bases=knowledge_bases, device="cpu", **settings)
        retriever = Retriever(config, "m", reader_id="test-reader", clock=clock)
        made.append(retriever)
        retriever.load()
        return retriever

    yield build
    for retriever in made:
        retriever.close()


def test_followed_kb_switches_to_a_new_version_on_refresh(tmp_path: Path, make: Any) -> None:
    _publish(tmp_path, "a", "one")
    r = make({"a": "latest"})
    _publish(tmp_path, "a", "two")
    assert r.knowledge_bases() == {"a": 1} and _source(r, "a") == "one.md"  # nothing moves before a refresh
    assert r.refresh() == [("a", 1, 2)]
    assert r.knowledge_bases() == {"a": 2} and _source(r, "a") == "two.md"
    assert r.refresh() == []
    r.warmup()
    r.check_health()


def test_pinned_kb_never_switches(tmp_path: Path, make: Any) -> None:
    _publish(tmp_path, "a", "a-one")
    _publish(tmp_path, "b", "b-one")
    r = make({"a": 1, "b": "latest"})
    _publish(tmp_path, "a", "a-two")
    _publish(tmp_path, "b", "b-two")
    assert r.refresh() == [("b", 1, 2)]
    assert r.knowledge_bases() == {"a": 1, "b": 2}
    assert _source(r, "a") == "a-one.md"


def test_refresh_interval_zero_never_switches(tmp_path: Path, make: Any) -> None:
    _publish(tmp_path, "a", "one")
    r = make({"a": "latest"}, refresh_interval_s=0)
    _publish(tmp_path, "a", "two")
    assert r.refresh() == []
    assert r.knowledge_bases() == {"a": 1}


def test_discovered_kbs_appear_and_are_dropped_when_deleted(tmp_path: Path, make: Any) -> None:
    _publish(tmp_path, "a", "a-one")
    _publish(tmp_path, "b", "b-one")
    (tmp_path / "empty").mkdir()  # no published version: not a KB yet
    (tmp_path / "not a kb").mkdir()
    r = make({"a": "latest"}, discover=True)
    assert r.knowledge_bases() == {"a": 1, "b": 1}
    _publish(tmp_path, "c", "c-one")
    assert r.refresh() == [("c", None, 1)]
    assert _source(r, "c") == "c-one.md"
    shutil.rmtree(tmp_path / "c")
    assert r.refresh() == [("c", 1, None)]
    assert r.knowledge_bases() == {"a": 1, "b": 1}
    with pytest.raises(KnowledgeBaseNotFoundError):
        r.search("c", QUERY)


def test_without_discover_other_kbs_are_not_served(tmp_path: Path, make: Any) -> None:
    _publish(tmp_path, "a", "a-one")
    r = make({"a": "latest"})
    _publish(tmp_path, "b", "b-one")
    assert r.refresh() == []
    assert r.knowledge_bases() == {"a": 1}


def test_discovered_kb_of_another_model_is_skipped_not_fatal(tmp_path: Path, make: Any,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    _publish(tmp_path, "a", "a-one")
    _publish(tmp_path, "other", "o-one", model="another-model")
    with caplog.at_level(logging.WARNING, logger="rag.retrieval"):
        r = make({"a": "latest"}, discover=True)
    assert r.knowledge_bases() == {"a": 1}
    assert "'other'" in caplog.text and "another-model" in caplog.text


def test_listed_latest_kb_that_vanishes_keeps_serving_and_warns_once(tmp_path: Path, make: Any,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    _publish(tmp_path, "a", "one")
    _publish(tmp_path, "a", "two")
    r = make({"a": "latest"}, discover=True)
    shutil.rmtree(tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="rag.retrieval"):
        assert r.refresh() == []
        assert r.refresh() == []
    assert caplog.text.count("no published version") == 1
    assert _source(r, "a") == "two.md"
    _publish(tmp_path, "a", "again")  # re-ingested from scratch: v1, older than v2 but what is published now
    assert r.refresh() == [("a", 2, 1)]
    assert _source(r, "a") == "again.md"


@pytest.mark.parametrize("breakage", ["truncated", "other model"])
def test_bad_new_version_is_skipped_retried_later_and_a_good_one_picked_up(
        tmp_path: Path, make: Any, caplog: pytest.LogCaptureFixture, breakage: str) -> None:
    _publish(tmp_path, "a", "one")
    clock = _Clock()
    r = make({"a": "latest"}, clock=clock)
    if breakage == "truncated":
        _publish(tmp_path, "a", "two")
        faiss_file = tmp_path / "a" / "v2" / "index.faiss"
        faiss_file.write_bytes(faiss_file.read_bytes()[:20])
    else:
        _publish(tmp_path, "a", "two", model="another-model")
    with caplog.at_level(logging.WARNING, logger="rag.retrieval"):
        assert r.refresh() == []
        assert r.refresh() == []  # backing off: not tried again at once
        clock.now += RETRY_MAX_S
        assert r.refresh() == []  # tried again, and failed again
    assert caplog.text.count("cannot load version 2") == 2
    assert r.knowledge_bases() == {"a": 1} and _source(r, "a") == "one.md"
    r.check_health()
    _publish(tmp_path, "a", "three")
    assert r.refresh() == [("a", 1, 3)]  # a newer version is tried without waiting out the back-off
    assert _source(r, "a") == "three.md"


@pytest.fixture
def instrumented(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Searches on the thread named "slow" block inside the index until `release` is set; closes are recorded."""
    state: dict[str, Any] = {"entered": threading.Event(), "release": threading.Event(), "closed": []}
    search, close = KnowledgeBaseIndex.search, KnowledgeBaseIndex.close

    def slow_search(self: KnowledgeBaseIndex, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "slow":
            state["entered"].set()
            assert state["release"].wait(10)
        return search(self, *args, **kwargs)

    def recorded_close(self: KnowledgeBaseIndex) -> None:
        state["closed"].append(self.version)
        close(self)

    monkeypatch.setattr(KnowledgeBaseIndex, "search", slow_search)
    monkeypatch.setattr(KnowledgeBaseIndex, "close", recorded_close)
    return state


def _search_on_thread(r: Retriever, kb: str) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(_source(r, kb))
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run, name="slow")
    thread.start()
    return thread, result


def test_search_running_during_a_swap_finishes_on_the_old_index(tmp_path: Path, make: Any,
                                                                 instrumented: dict[str, Any]) -> None:
    _publish(tmp_path, "a", "one")
    r = make({"a": "latest"})
    _publish(tmp_path, "a", "two")
    thread, result = _search_on_thread(r, "a")
    assert instrumented["entered"].wait(10)
    assert r.refresh() == [("a", 1, 2)]
    assert _source(r, "a") == "two.md"  # new searches already go to the new index
    assert instrumented["closed"] == []  # but the old one stays open under the running search
    instrumented["release"].set()
    thread.join(10)
    assert result == ["one.md"]
    assert instrumented["closed"] == [1]


def test_close_waits_for_running_searches_before_closing_their_index(tmp_path: Path, make: Any,
                                                                     instrumented: dict[str, Any]) -> None:
    _publish(tmp_path, "a", "one")
    r = make({"a": "latest"})
    thread, result = _search_on_thread(r, "a")
    assert instrumented["entered"].wait(10)
    r.close()
    assert instrumented["closed"] == []
    instrumented["release"].set()
    thread.join(10)
    assert result == ["one.md"] and instrumented["closed"] == [1]


def test_refresh_after_close_loads_nothing_and_leases_nothing(tmp_path: Path, make: Any,
                                                              instrumented: dict[str, Any]) -> None:
    _publish(tmp_path, "a", "one")
    r = make({"a": "latest"}, discover=True)
    r.close()
    _publish(tmp_path, "a", "two")
    _publish(tmp_path, "b", "b-one")
    assert r.refresh() == []
    assert r.knowledge_bases() == {}
    assert instrumented["closed"] == [1]
    assert not (tmp_path / "a" / READERS_DIR / "test-reader.json").exists()


def test_many_searches_across_many_swaps_never_fail(tmp_path: Path, make: Any) -> None:
    _publish(tmp_path, "a", "v1")
    r = make({"a": "latest"})
    stop, failures, seen = threading.Event(), [], set()

    def hammer() -> None:
        while not stop.is_set():
            try:
                seen.add(_source(r, "a"))
            except Exception as exc:
                failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for n in range(2, 7):
            _publish(tmp_path, "a", f"v{n}")
            assert r.refresh() == [("a", n - 1, n)]
        deadline = time.monotonic() + 10  # the searchers must get to run on the last version at least once
        while "v6.md" not in seen and not failures and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert failures == []
    assert r.knowledge_bases() == {"a": 6} and "v6.md" in seen


def test_leases_follow_the_served_versions_and_protect_them_from_pruning(tmp_path: Path, make: Any) -> None:
    _publish(tmp_path, "a", "a-one")
    _publish(tmp_path, "b", "b-one")
    _publish(tmp_path, "b", "b-two")
    r = make({"a": "latest", "b": 1}, lease_ttl_s=30)
    assert versions_in_use(tmp_path, "b", 30) == {1}
    assert prune_versions(tmp_path, "b", keep=1, ttl_s=30) == []  # pinned v1 is leased
    _publish(tmp_path, "a", "a-two")
    _publish(tmp_path, "a", "a-three")
    r.refresh()
    assert versions_in_use(tmp_path, "a", 30) == {3}
    assert prune_versions(tmp_path, "a", keep=1, ttl_s=30) == [1, 2]
    r.close()
    assert list((tmp_path / "a" / READERS_DIR).iterdir()) == []
    assert list((tmp_path / "b" / READERS_DIR).iterdir()) == []


def test_refresh_renews_leases_as_a_heartbeat(tmp_path: Path, make: Any) -> None:
    _publish(tmp_path, "a", "one")
    clock = _Clock()
    r = make({"a": 1}, lease_ttl_s=30, clock=clock)
    lease = tmp_path / "a" / READERS_DIR / "test-reader.json"
    lease.unlink()  # as a prune that found it stale would
    r.refresh()
    assert not lease.exists()  # written less than ttl/3 ago: not rewritten yet
    clock.now += 10
    r.refresh()
    assert lease.exists()


def test_default_reader_ids_are_unique_and_bad_ones_refused(tmp_path: Path) -> None:
    config = RetrievalConfig(kb_root=tmp_path, knowledge_bases={"a": "latest"})
    assert Retriever(config, "m").reader_id != Retriever(config, "m").reader_id
    with pytest.raises(InvalidRequestError, match="reader id"):
        Retriever(config, "m", reader_id="../escape")


def test_a_replica_starting_during_a_model_switch_serves_the_newest_index_of_its_own_model(tmp_path: Path,
                                                                                           make: Any) -> None:
    _publish(tmp_path, "a", "mine")
    _publish(tmp_path, "a", "rebuilt-for-the-next-version", model="other")
    r = make({"a": "latest"})
    assert r.knowledge_bases() == {"a": 1} and _source(r, "a") == "mine.md"
    assert r.refresh() == [] and r.knowledge_bases() == {"a": 1}  # the other model's index is refused
    _publish(tmp_path, "a", "mine-again")
    r.refresh()
    assert r.knowledge_bases() == {"a": 3}
