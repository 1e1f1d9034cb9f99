"""What the loader refuses (FIFOs, links leading outside, broken links, deep JSON, files over the size
limit) and the links it follows, each named in one clear error."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from rag.documents import MAX_JSON_DEPTH, copy_document, iter_files, load_directory, load_file
from rag.errors import UnsupportedDocumentError
from tests.rag.files import write


def _source_folder(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    write(source / "good.md", "A good document.")
    return source


@pytest.mark.timeout(20)
def test_fifo_is_refused_by_name_without_being_opened(tmp_path: Path) -> None:
    source = _source_folder(tmp_path)
    os.mkfifo(source / "pipe.md")  # opening it for reading would block until a writer came
    with pytest.raises(UnsupportedDocumentError, match=r"pipe\.md is a FIFO, not a regular file"):
        iter_files(source)
    with pytest.raises(UnsupportedDocumentError, match="FIFO"):
        load_file(source / "pipe.md", source)
    with pytest.raises(UnsupportedDocumentError, match="FIFO"):
        load_file(source / "pipe.md")


def test_symlink_to_a_file_outside_is_refused(tmp_path: Path) -> None:
    source = _source_folder(tmp_path)
    secret = write(tmp_path / "outside" / "secret.md", "not for the index")
    (source / "sub").mkdir()
    (source / "sub" / "link.md").symlink_to(secret)
    with pytest.raises(UnsupportedDocumentError, match=r"sub/link\.md is a symlink leading outside"):
        iter_files(source)
    with pytest.raises(UnsupportedDocumentError, match="outside the source folder"):
        load_file(source / "sub" / "link.md", source)


def test_symlink_to_a_folder_outside_is_refused(tmp_path: Path) -> None:
    source = _source_folder(tmp_path)
    write(tmp_path / "outside" / "secret.md", "not for the index")
    (source / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(UnsupportedDocumentError, match=r"linked is a symlink leading outside"):
        iter_files(source)


def test_broken_symlink_is_refused(tmp_path: Path) -> None:
    source = _source_folder(tmp_path)
    (source / "gone.md").symlink_to(source / "missing.md")
    with pytest.raises(UnsupportedDocumentError, match=r"gone\.md cannot be resolved"):
        iter_files(source)


def test_every_refusal_is_named_in_one_error(tmp_path: Path) -> None:
    source = _source_folder(tmp_path)
    for n in range(5):
        os.mkfifo(source / f"pipe{n}.md")
    with pytest.raises(UnsupportedDocumentError) as info:
        iter_files(source)
    message = str(info.value)
    assert "pipe0.md" in message and "pipe2.md" in message
    assert "pipe3.md" not in message
    assert "(and 2 more)" in message
    assert "\n" not in message


def test_symlinks_inside_the_folder_are_read_once_under_their_own_name(tmp_path: Path) -> None:
    source = _source_folder(tmp_path)
    write(source / ".drafts" / "draft.md", "A draft kept in a hidden folder.")
    (source / "draft-link.md").symlink_to(source / ".drafts" / "draft.md")  # otherwise skipped as hidden
    (source / "again.md").symlink_to(source / "good.md")  # same content as good.md: not indexed twice
    (source / "sub").mkdir()
    (source / "sub" / "up").symlink_to(source, target_is_directory=True)  # a loop, not walked
    files = iter_files(source)
    assert [p.relative_to(source).as_posix() for p in files] == ["draft-link.md", "good.md"]
    docs = load_directory(source)
    assert [(d.metadata["source"], d.page_content) for d in docs] == [
        ("draft-link.md", "A draft kept in a hidden folder."), ("good.md", "A good document.")]


def test_root_and_file_spelt_through_different_links(tmp_path: Path) -> None:
    source = _source_folder(tmp_path)
    (tmp_path / "alias").symlink_to(source, target_is_directory=True)
    [doc] = load_file(source / "good.md", tmp_path / "alias")
    assert doc.metadata["source"] == "good.md"


def _nested(depth: int) -> str:
    return '{"a": ' * (depth - 1) + '["deep"]' + "}" * (depth - 1)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 900, 100_000])
def test_deeply_nested_json_is_refused_by_name(tmp_path: Path, depth: int) -> None:
    with pytest.raises(UnsupportedDocumentError, match=rf"deep\.json: JSON nested deeper than {MAX_JSON_DEPTH}"):
        load_file(write(tmp_path / "deep.json", _nested(depth)), tmp_path)


def test_deeply_nested_jsonl_line_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "deep.jsonl", '{"ok": 1}\n' + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(UnsupportedDocumentError, match=r"deep\.jsonl: JSON on line 2 nested deeper"):
        load_file(path, tmp_path)


def test_json_at_the_depth_limit_loads(tmp_path: Path) -> None:
    [doc] = load_file(write(tmp_path / "ok.json", _nested(MAX_JSON_DEPTH)), tmp_path)
    assert doc.page_content.endswith("deep")


def test_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "big.txt", "x" * 1001)
    with pytest.raises(UnsupportedDocumentError, match=r"big\.txt: larger than the 1000-byte limit"):
        load_file(path, tmp_path, max_bytes=1000)
    assert load_file(path, tmp_path, max_bytes=1001)[0].page_content == "x" * 1001
    with pytest.raises(UnsupportedDocumentError, match="1000-byte limit"):
        load_directory(tmp_path, max_bytes=1000)


def test_a_document_is_copied_a_block_at_a_time_with_its_digest_and_refused_past_the_limit(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several blocks and a partial one
    (tmp_path / "in.pdf").write_bytes(data)
    assert copy_document(tmp_path / "in.pdf", tmp_path / "out.pdf", len(data)) == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "out.pdf").read_bytes() == data
    with pytest.raises(UnsupportedDocumentError, match=f"larger than the {len(data) - 1}-byte limit"):
        copy_document(tmp_path / "in.pdf", tmp_path / "again.pdf", len(data) - 1)
    os.mkfifo(tmp_path / "pipe.pdf")
    with pytest.raises(UnsupportedDocumentError, match="not a regular file"):
        copy_document(tmp_path / "pipe.pdf", tmp_path / "p.pdf", 1024)
