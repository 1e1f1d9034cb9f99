"""Loading and splitting knowledge-base files, with real parsers on files written per test."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import docx
import pytest
from langchain_core.documents import Document

from rag.config import SplitterConfig
from rag.documents import (
    SUPPORTED_SUFFIXES,
    build_splitter,
    content_fingerprint,
    iter_files,
    load_directory,
    load_file,
    split_documents,
)
from rag.errors import UnsupportedDocumentError
from tests.rag.files import pdf_bytes, write

# --- loading -------------------------------------------------------------------------------------


def test_text_source_is_relative_posix_path_under_root(tmp_path: Path) -> None:
    path = write(tmp_path / "guides" / "setup.md", "# Setup\n\nRun make demo.\n")
    [doc] = load_file(path, tmp_path)
    assert doc.page_content == "# Setup\n\nRun make demo."
    assert doc.metadata == {"source": "guides/setup.md"}


def test_source_without_root_is_file_name(tmp_path: Path) -> None:
    path = write(tmp_path / "a" / "notes.txt", "hello")
    assert load_file(path)[0].metadata["source"] == "notes.txt"


def test_gb18030_chinese_text_is_decoded(tmp_path: Path) -> None:
    text = "知识库问答服务。支持中文文档。"
    path = write(tmp_path / "zh.txt", text.encode("gb18030"))
    assert load_file(path)[0].page_content == text


def test_undecodable_text_raises_naming_file(tmp_path: Path) -> None:
    path = write(tmp_path / "binary.txt", b"\xff\xfe\x80 not text")
    with pytest.raises(UnsupportedDocumentError, match=r"binary\.txt.*decode"):
        load_file(path)


def test_pdf_one_document_per_non_empty_page(tmp_path: Path) -> None:
    pdf = pdf_bytes(["Ray Serve deploys replicas", "", "FAISS stores vectors"])
    path = write(tmp_path / "manual.pdf", pdf)
    docs = load_file(path, tmp_path)
    assert [(d.metadata["page"], d.page_content) for d in docs] == [
        (1, "Ray Serve deploys replicas"), (3, "FAISS stores vectors")]
    assert {d.metadata["source"] for d in docs} == {"manual.pdf"}


def test_corrupt_pdf_raises_naming_file(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.pdf", b"%PDF-1.4\nthis is not really a pdf")
    with pytest.raises(UnsupportedDocumentError, match=r"broken\.pdf.*PDF"):
        load_file(path)


def test_docx_paragraphs_and_table_cells(tmp_path: Path) -> None:
    document = docx.Document()
    document.add_paragraph("Upgrading the pipeline")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "max_surge_percent"
    table.rows[0].cells[1].text = "100"
    document.add_paragraph("Shift traffic step by step.")
    path = tmp_path / "upgrade.docx"
    document.save(str(path))
    [doc] = load_file(path, tmp_path)
    assert doc.page_content.splitlines() == [
        "Upgrading the pipeline", "max_surge_percent | 100", "Shift traffic step by step."]
    assert doc.metadata["source"] == "upgrade.docx"


def test_corrupt_docx_raises(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.docx", b"PK\x03\x04 truncated zip")
    with pytest.raises(UnsupportedDocumentError, match=r"broken\.docx.*DOCX"):
        load_file(path)


def test_html_text_without_links_images_or_scripts(tmp_path: Path) -> None:
    markup = """<html><head><title>  Gateway
      API </title><script>var secret = 1;</script></head>
      <body><h1>Endpoints</h1><p>Call <a href="http://example.com/x">the health route</a> first.
      <img src="diagram.png" alt="diagram"></p></body></html>"""
    [doc] = load_file(write(tmp_path / "api.html", markup), tmp_path)
    assert "Endpoints" in doc.page_content
    assert "Call the health route first." in doc.page_content
    for noise in ("example.com", "diagram", "secret", "<p>"):
        assert noise not in doc.page_content
    assert doc.metadata == {"source": "api.html", "title": "Gateway API"}


def test_csv_one_document_per_row(tmp_path: Path) -> None:
    path = write(tmp_path / "glossary.csv", 'term,definition\nKB,"knowledge base, a folder"\nTTFT,\n')
    docs = load_file(path, tmp_path)
    assert [d.page_content for d in docs] == ["term: KB\ndefinition: knowledge base, a folder", "term: TTFT"]
    assert [d.metadata for d in docs] == [{"source": "glossary.csv", "row": 1},
                                          {"source": "glossary.csv", "row": 2}]


def test_json_list_gives_one_document_per_item(tmp_path: Path) -> None:
    items = [{"question": "How to stop?", "answer": "make stop"}, "plain string item"]
    docs = load_file(write(tmp_path / "faq.json", json.dumps(items)), tmp_path)
    assert [(d.metadata["row"], d.page_content) for d in docs] == [
        (1, "question: How to stop?\nanswer: make stop"), (2, "plain string item")]


def test_json_object_gives_one_document_of_its_values(tmp_path: Path) -> None:
    data = {"title": "Ports", "body": {"dashboard": "8265", "http": 8000}}
    [doc] = load_file(write(tmp_path / "ports.json", json.dumps(data)), tmp_path)
    assert "title: Ports" in doc.page_content
    assert "dashboard: 8265" in doc.page_content and "http: 8000" in doc.page_content
    assert "row" not in doc.metadata


def test_invalid_json_raises(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedDocumentError, match=r"bad\.json.*invalid JSON"):
        load_file(write(tmp_path / "bad.json", "{not json"))


def test_jsonl_rows_are_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", '{"text": "first"}\n\n"second"\n')
    docs = load_file(path, tmp_path)
    assert [(d.metadata["row"], d.page_content) for d in docs] == [(1, "text: first"), (3, "second")]
    with pytest.raises(UnsupportedDocumentError, match="line 2"):
        load_file(write(tmp_path / "bad.jsonl", '"ok"\n{oops\n'))


def test_unsupported_suffix_lists_supported_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "slides.pptx", b"whatever")
    with pytest.raises(UnsupportedDocumentError) as info:
        load_file(path)
    message = str(info.value)
    assert "slides.pptx" in message and "'.pptx'" in message
    assert all(suffix in message for suffix in SUPPORTED_SUFFIXES)


@pytest.mark.parametrize("name", ["empty.txt", "empty.pdf", "empty.json", "empty.csv", "empty.docx"])
def test_empty_file_gives_no_documents(tmp_path: Path, name: str) -> None:
    assert load_file(write(tmp_path / name, b"")) == []


def test_whitespace_only_text_gives_no_documents(tmp_path: Path) -> None:
    assert load_file(write(tmp_path / "blank.md", "  \n\n\t\n")) == []


# --- directories ---------------------------------------------------------------------------------


def test_iter_files_sorted_recursive_and_skips_hidden_and_unsupported(tmp_path: Path) -> None:
    for name in ["b.txt", "a/z.md", "a/c.CSV", ".hidden.txt", ".git/config.txt", "a/.cache/x.md",
                 "image.png", "notes"]:
        write(tmp_path / name, "x")
    relative = [p.relative_to(tmp_path).as_posix() for p in iter_files(tmp_path)]
    assert relative == ["a/c.CSV", "a/z.md", "b.txt"]


def test_load_directory_loads_every_supported_file(tmp_path: Path) -> None:
    write(tmp_path / "one.txt", "first file")
    write(tmp_path / "sub" / "two.csv", "k,v\na,1\nb,2\n")
    write(tmp_path / ".secret.txt", "hidden")
    docs = load_directory(tmp_path)
    assert [(d.metadata["source"], d.page_content) for d in docs] == [
        ("one.txt", "first file"), ("sub/two.csv", "k: a\nv: 1"), ("sub/two.csv", "k: b\nv: 2")]


def test_load_directory_propagates_errors(tmp_path: Path) -> None:
    write(tmp_path / "good.txt", "fine")
    write(tmp_path / "bad.pdf", b"garbage")
    with pytest.raises(UnsupportedDocumentError, match=r"bad\.pdf"):
        load_directory(tmp_path)



# --- splitting -----------------------------------------------------------------------------------

ENGLISH = " ".join(f"Sentence number {i} explains one more detail of the service." for i in range(40))


def _english_chunks(size: int = 200, overlap: int = 60) -> list[Document]:
    doc = Document(page_content=ENGLISH, metadata={"source": "guide.txt"})
    return split_documents([doc], SplitterConfig(chunk_size=size, chunk_overlap=overlap))


def test_split_respects_chunk_size_and_numbers_chunks() -> None:
    chunks = _english_chunks()
    assert len(chunks) > 5
    assert all(0 < len(c.page_content) <= 200 for c in chunks)
    assert [c.metadata["chunk"] for c in chunks] == list(range(len(chunks)))
    assert all(c.metadata["source"] == "guide.txt" for c in chunks)
    for c in chunks:
        start = c.metadata["start_index"]
        assert ENGLISH[start:start + len(c.page_content)] == c.page_content
        assert c.page_content == c.page_content.strip()


def test_consecutive_chunks_overlap() -> None:
    chunks = _english_chunks()
    for previous, current in itertools.pairwise(chunks):
        previous_end = previous.metadata["start_index"] + len(previous.page_content)
        assert current.metadata["start_index"] < previous_end
    without = _english_chunks(overlap=0)
    assert len(without) < len(chunks)


def test_english_chunks_end_at_sentence_boundaries() -> None:
    assert all(c.page_content.endswith(".") for c in _english_chunks())


def test_chinese_text_splits_after_full_stops() -> None:
    sentences = [f"第{i}句话介绍了知识库问答服务的一个部署细节。" for i in range(30)]
    doc = Document(page_content="".join(sentences), metadata={"source": "faq_zh.md"})
    chunks = split_documents([doc], SplitterConfig(chunk_size=60, chunk_overlap=20))
    assert len(chunks) > 5
    assert all(len(c.page_content) <= 60 and c.page_content.endswith("。") for c in chunks)
    # Sentences start a chunk rather than being cut in the middle.
    assert all(c.page_content.startswith("第") for c in chunks)


def test_chunk_numbering_restarts_per_document() -> None:
    docs = [Document(page_content=ENGLISH, metadata={"source": "a.pdf", "page": p}) for p in (1, 2)]
    chunks = split_documents(docs, SplitterConfig(chunk_size=300, chunk_overlap=0))
    by_page = {p: [c.metadata["chunk"] for c in chunks if c.metadata["page"] == p] for p in (1, 2)}
    assert by_page[1] == by_page[2] == list(range(len(by_page[1])))
    assert len(by_page[1]) > 1


def test_build_splitter_uses_config_sizes() -> None:
    splitter = build_splitter(SplitterConfig(chunk_size=120, chunk_overlap=30))
    pieces = splitter.split_text(ENGLISH)
    assert max(len(p) for p in pieces) <= 120
    assert max(len(p) for p in pieces) > 60


# --- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_changes_only_with_content(tmp_path: Path) -> None:
    a = write(tmp_path / "a.txt", "alpha")
    b = write(tmp_path / "sub" / "b.md", "beta")
    first = content_fingerprint([a, b], tmp_path)
    assert content_fingerprint([b, a], tmp_path) == first
    a.touch()  # a new mtime alone is not a change
    assert content_fingerprint([a, b], tmp_path) == first

    a.write_text("alpha!", encoding="utf-8")
    changed = content_fingerprint([a, b], tmp_path)
    assert changed != first
    a.write_text("alpha", encoding="utf-8")
    assert content_fingerprint([a, b], tmp_path) == first

    renamed = a.rename(tmp_path / "c.txt")
    assert content_fingerprint([renamed, b], tmp_path) != first
    assert content_fingerprint([b], tmp_path) != first


def test_every_supported_type_has_a_parser() -> None:
    from rag import documents

    assert set(documents._LOADERS) == SUPPORTED_SUFFIXES
