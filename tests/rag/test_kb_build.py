"""Incremental builds and the knowledge-base store, with a counting fake embedder (no model, no Ray)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from rag import kb_store
from rag.config import PipelineConfig, SplitterConfig
from rag.errors import ConflictError, DocumentNotFoundError, InvalidRequestError, UnsupportedDocumentError
from rag.index import KnowledgeBaseIndex
from rag.kb_build import Changes, update_knowledge_base
from rag.kb_versions import list_versions

CONFIG = PipelineConfig(splitter=SplitterConfig(chunk_size=200, chunk_overlap=20))


class CountingEmbedder:
    def __init__(self) -> None:
        self.texts: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self.lock:
            self.texts += texts
        rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=8)
                for t in texts]
        vectors = np.array(rows, dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _doc(topic: str, paragraphs: int = 4) -> bytes:
    return "\n\n".join(f"{topic} paragraph {i}: " + f"{topic} words " * 12 for i in range(paragraphs)).encode()


def _update(root: Path, embed: CountingEmbedder, **changes: object):
    return update_knowledge_base(root, "kb", CONFIG, Changes(**changes), embed=embed)  # type: ignore[arg-type]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    kb_store.create(tmp_path, "kb", "test", CONFIG.embedding.model)
    return tmp_path


def test_a_one_file_change_embeds_only_that_file(root: Path) -> None:
    embed = CountingEmbedder()
    first = _update(root, embed, add={f"doc{i}.md": _doc(f"topic{i}") for i in range(10)})
    total = len(embed.texts)
    assert first.created and first.manifest.count == total and first.embedded == total
    embed.texts.clear()
    second = _update(root, embed, add={"doc3.md": _doc("changed")})
    assert second.manifest.version == first.manifest.version + 1
    assert embed.texts and all("changed" in t for t in embed.texts)
    assert second.reused == second.manifest.count - second.embedded
    assert second.manifest.files["doc3.md"]["sha256"] == hashlib.sha256(_doc("changed")).hexdigest()
    assert second.manifest.files["doc4.md"] == first.manifest.files["doc4.md"]


def test_deleting_a_file_embeds_nothing_and_drops_its_chunks(root: Path) -> None:
    embed = CountingEmbedder()
    _update(root, embed, add={"a.md": _doc("alpha"), "b.md": _doc("beta")})
    embed.texts.clear()
    result = _update(root, embed, delete=("a.md",))
    assert embed.texts == [] and set(result.manifest.files) == {"b.md"}
    index = KnowledgeBaseIndex.load(root, "kb")
    assert {p.source for p in index.search(np.ones((1, 8), np.float32) / 8 ** 0.5, 50)[0]} == {"b.md"}
    assert not kb_store.original_path(root, "kb", "a.md").exists()


def test_delete_keeping_the_original_then_re_upload_embeds_only_that_file(root: Path) -> None:
    embed = CountingEmbedder()
    _update(root, embed, add={"a.md": _doc("alpha"), "b.md": _doc("beta")})
    _update(root, embed, delete=("a.md",), keep_originals=True)
    assert kb_store.read_original(root, "kb", "a.md") == _doc("alpha")
    embed.texts.clear()
    again = _update(root, embed, add={"a.md": _doc("alpha")})
    assert embed.texts and all("alpha" in t for t in embed.texts)
    assert again.embedded == len(embed.texts) and set(again.manifest.files) == {"a.md", "b.md"}


def test_unchanged_upload_publishes_nothing(root: Path) -> None:
    embed = CountingEmbedder()
    first = _update(root, embed, add={"a.md": _doc("alpha")})
    again = _update(root, embed, add={"a.md": _doc("alpha")})
    assert not again.created and list_versions(root, "kb") == [first.manifest.version]


def test_files_given_by_path_are_copied_and_one_over_the_limit_is_named_as_sent(root: Path, tmp_path: Path) -> None:
    spooled = tmp_path / "00000"
    spooled.write_bytes(_doc("alpha"))
    built = update_knowledge_base(root, "kb", CONFIG, Changes(add={"a.md": spooled}), embed=CountingEmbedder())
    assert kb_store.read_original(root, "kb", "a.md") == _doc("alpha") and spooled.exists()
    assert built.manifest.files["a.md"]["sha256"] == hashlib.sha256(_doc("alpha")).hexdigest()
    spooled.write_bytes(_doc("beta") * 20)
    with pytest.raises(UnsupportedDocumentError, match=r"^b\.md: larger than the 1024-byte limit"):
        update_knowledge_base(root, "kb", CONFIG, Changes(add={"b.md": spooled}), embed=CountingEmbedder(),
                              max_file_bytes=1024)
    assert list_versions(root, "kb") == [1]


def test_override_false_refuses_other_content_and_changes_nothing(root: Path) -> None:
    embed = CountingEmbedder()
    _update(root, embed, add={"a.md": _doc("alpha")})
    with pytest.raises(ConflictError, match=r"a\.md"):
        _update(root, embed, add={"a.md": _doc("other")}, override=False)
    assert kb_store.read_original(root, "kb", "a.md") == _doc("alpha") and len(list_versions(root, "kb")) == 1


def test_a_bad_file_refuses_the_whole_change_and_nothing_stored_changes(root: Path) -> None:
    embed = CountingEmbedder()
    _update(root, embed, add={"a.md": _doc("alpha")})
    with pytest.raises(UnsupportedDocumentError):
        _update(root, embed, add={"good.md": _doc("good"), "broken.pdf": b"%PDF-1.4 this is not a pdf"})
    assert list_versions(root, "kb") == [1]
    assert sorted(p.name for p in kb_store.content_directory(root, "kb").iterdir()) == ["a.md"]
    assert [p.name for p in kb_store.kb_directory(root, "kb").iterdir() if p.name.startswith(".incoming")] == []


def test_with_skip_unreadable_a_bad_file_fails_alone_and_a_stored_one_keeps_its_indexed_version(root: Path) -> None:
    embed = CountingEmbedder()
    _update(root, embed, add={"a.md": _doc("alpha"), "b.md": _doc("beta")})
    result = _update(root, embed, skip_unreadable=True,
                     add={"good.md": _doc("good"), "broken.pdf": b"%PDF-1.4 this is not a pdf",
                          "empty.md": b"  \n", "b.md": b"%PDF? no: an md file that is fine " * 3,
                          "a.md": _doc("alpha again")})
    assert set(result.failed) == {"broken.pdf", "empty.md"}
    assert "broken.pdf" in result.failed["broken.pdf"] and "no text" in result.failed["empty.md"]
    assert set(result.manifest.files) == {"a.md", "b.md", "good.md"} and result.created
    content = kb_store.content_directory(root, "kb")
    assert sorted(p.name for p in content.iterdir()) == ["a.md", "b.md", "good.md"]  # no failed original lands
    assert kb_store.read_original(root, "kb", "a.md") == _doc("alpha again")


def test_with_skip_unreadable_a_failed_replacement_keeps_the_stored_file_and_publishes_nothing(root: Path) -> None:
    embed = CountingEmbedder()
    first = _update(root, embed, add={"a.pdf": _pdf_like(), "b.md": _doc("beta")}, skip_unreadable=True)
    assert set(first.failed) == {"a.pdf"} and set(first.manifest.files) == {"b.md"}
    again = _update(root, embed, add={"b.md": b"%PDF-1.4 broken"[:0] + b"\n"}, skip_unreadable=True)
    assert not again.created and set(again.failed) == {"b.md"} and list_versions(root, "kb") == [1]
    assert kb_store.read_original(root, "kb", "b.md") == _doc("beta")
    with pytest.raises(UnsupportedDocumentError, match=r"no file could be indexed.*x\.pdf"):
        update_knowledge_base(root, "fresh", CONFIG, Changes(add={"x.pdf": b"junk"}, skip_unreadable=True),
                              embed=embed)


def _pdf_like() -> bytes:
    return b"%PDF-1.4 truncated"


@pytest.mark.parametrize("name", ["../evil.md", "/etc/passwd.md", "a/b.md", "..", ".hidden.md", "run.exe",
                                  "noext", "bad\x00name.md", "x" * 300 + ".md", "a\\b.md"])
def test_unsafe_or_unsupported_names_are_refused_naming_the_file(name: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        kb_store.check_file_name(name)
    assert repr(name)[1:20] in str(refused.value)  # quoted as repr: a control character shows escaped


def test_names_are_unicode_normalised() -> None:
    assert kb_store.check_file_name("cafe\u0301.md") == "caf\u00e9.md"
    assert kb_store.check_file_name("笔记.txt") == "笔记.txt"


def test_update_and_delete_of_unknown_files_name_them(root: Path) -> None:
    embed = CountingEmbedder()
    _update(root, embed, add={"a.md": _doc("alpha")})
    for changes in ({"delete": ("nope.md",)}, {"reindex": ("nope.md",)}):
        with pytest.raises(DocumentNotFoundError, match=r"nope\.md"):
            _update(root, embed, **changes)


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_deleting_every_file_leaves_an_empty_kb_that_finds_nothing_until_files_come_back(root: Path,
                                                                                        mode: str) -> None:
    from rag.config import RetrievalConfig
    from rag.retrieval import Retriever

    embed = CountingEmbedder()
    first = _update(root, embed, add={"a.md": _doc("alpha")})
    retriever = Retriever(RetrievalConfig(kb_root=root, knowledge_bases={"kb": "latest"}, device="cpu", mode=mode,
                                          refresh_interval_s=0.01), CONFIG.embedding.model)
    retriever.load()
    query = np.ones(first.manifest.dimension, dtype=np.float32) / np.sqrt(first.manifest.dimension)
    assert retriever.search("kb", query, 5, None, "alpha")
    emptied = _update(root, embed, delete=("a.md",))
    assert emptied.created and emptied.manifest.count == 0 and emptied.manifest.files == {}
    assert emptied.manifest.dimension == first.manifest.dimension
    retriever.refresh()  # a serving Retriever follows the KB into its empty version, warm-up included
    assert retriever.knowledge_bases() == {"kb": emptied.manifest.version}
    assert retriever.search("kb", query, 5, None, "alpha") == []
    retriever.warmup()
    retriever.check_health()
    with pytest.raises(ConflictError, match="no documents to rebuild"):
        _update(root, embed, rescan=True, full=True)  # recreate with nothing in content/
    refilled = _update(root, embed, add={"b.md": _doc("beta")})
    assert refilled.manifest.count > 0 and list(refilled.manifest.files) == ["b.md"]


def test_reindex_with_another_splitter_re_splits_from_the_stored_original(root: Path) -> None:
    embed = CountingEmbedder()
    first = _update(root, embed, add={"a.md": _doc("alpha", 8)})
    result = update_knowledge_base(root, "kb", CONFIG, Changes(reindex=("a.md",)), embed=embed,
                                   splitter=SplitterConfig(chunk_size=600, chunk_overlap=0))
    assert result.manifest.files["a.md"]["splitter"]["chunk_size"] == 600
    assert result.manifest.count < first.manifest.count


def test_recreate_rescans_content_and_embeds_everything(root: Path) -> None:
    embed = CountingEmbedder()
    _update(root, embed, add={"a.md": _doc("alpha")})
    kb_store.write_atomically(kb_store.original_path(root, "kb", "dropped.md"), _doc("dropped"))
    embed.texts.clear()
    result = _update(root, embed, rescan=True, full=True)
    assert set(result.manifest.files) == {"a.md", "dropped.md"} and result.embedded == result.manifest.count


def test_concurrent_uploads_of_different_files_both_end_up_in_the_index(root: Path) -> None:
    embed = CountingEmbedder()
    errors: list[BaseException] = []

    def upload(name: str) -> None:
        try:
            _update(root, embed, add={name: _doc(name)})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(f"f{i}.md",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    latest = KnowledgeBaseIndex.load(root, "kb").manifest
    assert set(latest.files) == {f"f{i}.md" for i in range(4)} and latest.version == 4


def test_kb_store_create_list_delete(tmp_path: Path) -> None:
    kb_store.create(tmp_path, "one", "first", "m")
    with pytest.raises(ConflictError):
        kb_store.create(tmp_path, "one", "again", "m")
    (tmp_path / "not a kb").mkdir()
    assert kb_store.list_names(tmp_path) == ["one"]
    kb_store.delete(tmp_path, "one")
    assert kb_store.list_names(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["not a kb"]


def test_what_killed_builds_and_deletes_left_behind_goes_with_the_next_build(tmp_path: Path) -> None:
    from rag import kb_store

    embed = CountingEmbedder()
    _update(tmp_path, embed, add={"a.md": _doc("alpha")})
    dead_build = tmp_path / "kb" / ".incoming-0123abcd"
    (dead_build / "sub").mkdir(parents=True)
    (dead_build / "sub" / "b.md").write_bytes(_doc("beta"))
    dead_delete = tmp_path / ".deleted-old-1a2b3c4d"
    (dead_delete / "v1").mkdir(parents=True)
    (dead_delete / "v1" / "index.faiss").write_bytes(b"x")
    _update(tmp_path, embed, add={"c.md": _doc("gamma")})
    assert not dead_build.exists() and not dead_delete.exists()
    assert kb_store.read_original(tmp_path, "kb", "a.md") == _doc("alpha")
    assert [p.name for p in (tmp_path / "kb").iterdir() if p.name.startswith(".incoming")] == []
    (dead_delete / "v1").mkdir(parents=True)
    kb_store.delete(tmp_path, "kb")  # a delete clears older trash too
    assert not dead_delete.exists() and list(tmp_path.iterdir()) == []


def test_originals_follow_the_index_when_a_build_dies_before_or_after_publishing(root: Path, monkeypatch) -> None:
    from rag import kb_build
    from rag.kb_build import indexed_original

    embed = CountingEmbedder()
    _update(root, embed, add={"a.md": _doc("alpha"), "b.md": _doc("beta")})

    def dies(*_: object, **__: object) -> None:
        raise OSError("killed")

    # Dying in the publish: content/ still holds what version 1 indexed.
    with monkeypatch.context() as patched:
        patched.setattr(kb_build, "publish_index", dies)
        with pytest.raises(OSError):
            _update(root, embed, add={"a.md": _doc("alpha v2")})
    assert list_versions(root, "kb") == [1] and kb_store.read_original(root, "kb", "a.md") == _doc("alpha")

    # Dying after the publish, before the originals moved: the index is version 2, its bytes wait incoming.
    with monkeypatch.context() as patched:
        patched.setattr(kb_build, "_move_into_content", dies)
        with pytest.raises(OSError):
            _update(root, embed, add={"a.md": _doc("alpha v3"), "new.md": _doc("new")})
    manifest = KnowledgeBaseIndex.load(root, "kb").manifest
    assert manifest.version == 2
    for name, data in {"a.md": _doc("alpha v3"), "new.md": _doc("new"), "b.md": _doc("beta")}.items():
        assert indexed_original(root, "kb", name, manifest.files[name]["sha256"]) == data  # what download_doc gives
    # The next writer moves them where they belong and drops the leftover folder.
    _update(root, embed, add={"c.md": _doc("gamma")})
    assert kb_store.read_original(root, "kb", "a.md") == _doc("alpha v3")
    assert kb_store.read_original(root, "kb", "new.md") == _doc("new")
    assert [p.name for p in (root / "kb").iterdir() if p.name.startswith(".incoming")] == []
