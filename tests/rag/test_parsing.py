"""Documents are parsed in limited child processes: a hostile file fails alone, quickly, with a message
that names it and the limit; the caller's process and the next file are unaffected."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rag.config import ParseLimits, SplitterConfig
from rag.documents import MAX_MARKUP_DEPTH, MAX_PDF_PAGES, MAX_UNPACKED_BYTES, load_file, split_documents
from rag.errors import UnsupportedDocumentError
from rag.parsing import Parser
from tests.rag.files import DEEP_MARKUP, SLOW_MARKUP, docx_bomb, pdf_bytes

SPLITTER = SplitterConfig(chunk_size=200, chunk_overlap=20)


@pytest.fixture(scope="module")
def parser() -> Iterator[Parser]:
    parse = Parser(ParseLimits(slots=2, cpu_s=3, wall_s=20, memory_mb=768))
    yield parse
    parse.close()


def _write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_chunks_are_the_same_as_parsing_in_process(parser: Parser, tmp_path: Path) -> None:
    path = _write(tmp_path, "guide.md", "# Guide\n\n" + "The kettle boils water quickly. " * 40)
    html = _write(tmp_path, "page.html", "<html><head><title>Tea</title></head><body><p>Green tea 绿茶.</p></body>")
    for file in (path, html):
        expected = split_documents(load_file(file, tmp_path), SPLITTER)
        got = parser(file, tmp_path, SPLITTER, 1 << 20)
        assert [(d.page_content, d.metadata) for d in got] == [(d.page_content, d.metadata) for d in expected]
    assert got[0].metadata["title"] == "Tea"


def test_a_file_that_burns_cpu_is_stopped_at_the_limit_and_the_next_file_parses(tmp_path: Path) -> None:
    # html2text renders each item with the whole nesting's indentation: seconds of CPU for 400 KB.
    slow = _write(tmp_path, "lists.html", SLOW_MARKUP)
    parse = Parser(ParseLimits(slots=1, cpu_s=1, wall_s=30))
    try:
        started = time.monotonic()
        with pytest.raises(UnsupportedDocumentError) as failed:
            parse(slow, tmp_path, SPLITTER, 1 << 22)
        assert time.monotonic() - started < 15
        assert "lists.html" in str(failed.value) and "1 s of CPU" in str(failed.value)
        assert str(tmp_path) in str(failed.value)  # the caller makes paths relative (kb_jobs.without_server_paths)
        ok = _write(tmp_path, "ok.txt", "the next file")
        assert parse(ok, tmp_path, SPLITTER, 1 << 20)[0].page_content == "the next file"
    finally:
        parse.close()


def test_a_file_that_needs_too_much_memory_fails_alone(tmp_path: Path) -> None:
    parse = Parser(ParseLimits(slots=1, cpu_s=20, wall_s=30, memory_mb=256))
    try:
        path = _write(tmp_path, "big.txt", "word " * 6_000_000)  # 30 MB: a few hundred MB once split
        with pytest.raises(UnsupportedDocumentError, match=r"big\.txt.*(memory|MiB)"):
            parse(path, tmp_path, SplitterConfig(chunk_size=50, chunk_overlap=10), 1 << 26)
        small = _write(tmp_path, "small.txt", "just a few words")
        assert parse(small, tmp_path, SPLITTER, 1 << 20)[0].page_content == "just a few words"
    finally:
        parse.close()


def test_a_wall_clock_limit_stops_a_parser_that_runs_too_long(tmp_path: Path) -> None:
    parse = Parser(ParseLimits(slots=1, cpu_s=30, wall_s=0.5))
    try:
        # Under the wall limit, not the CPU one: the same nested lists as above, with 30 s of CPU allowed.
        slow = _write(tmp_path, "lists.html", SLOW_MARKUP)
        started = time.monotonic()
        with pytest.raises(UnsupportedDocumentError, match=r"lists\.html: took more than 0\.5 s"):
            parse(slow, tmp_path, SPLITTER, 1 << 22)
        assert time.monotonic() - started < 5
        assert parse(_write(tmp_path, "ok.txt", "fine"), tmp_path, SPLITTER, 1 << 20)
    finally:
        parse.close()


def test_threads_share_the_slots_and_each_gets_its_own_files_chunks(parser: Parser, tmp_path: Path) -> None:
    files = [_write(tmp_path, f"doc{i}.txt", f"document number {i}. " * 50) for i in range(6)]
    results: dict[str, set[str]] = {}

    def parse(path: Path) -> None:
        results[path.name] = {d.page_content.split(".")[0] for d in parser(path, tmp_path, SPLITTER, 1 << 20)}

    workers = [threading.Thread(target=parse, args=(f,)) for f in files]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == {f"doc{i}.txt": {f"document number {i}"} for i in range(6)}


def test_docx_that_unpacks_past_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = _write(tmp_path, "bomb.docx", docx_bomb())
    assert path.stat().st_size < MAX_UNPACKED_BYTES // 100
    with pytest.raises(UnsupportedDocumentError, match=r"bomb\.docx.*unpacks to more than"):
        load_file(path, tmp_path)


def test_a_pdf_over_the_page_limit_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "long.pdf", pdf_bytes([""] * (MAX_PDF_PAGES + 1)))
    with pytest.raises(UnsupportedDocumentError, match=rf"long\.pdf.*{MAX_PDF_PAGES + 1} pages"):
        load_file(path, tmp_path)
    assert load_file(_write(tmp_path, "short.pdf", pdf_bytes(["one page"])), tmp_path)[0].metadata["page"] == 1


def test_markup_nested_past_the_limit_is_refused_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, "deep.html", DEEP_MARKUP)
    started = time.monotonic()
    with pytest.raises(UnsupportedDocumentError, match=rf"deep\.html.*nested deeper than {MAX_MARKUP_DEPTH}"):
        load_file(path, tmp_path)
    assert time.monotonic() - started < 5
    sloppy = _write(tmp_path, "sloppy.html", "<p>one<p>two<br><li>three<li>four<img src=x>" * 2000)
    assert "four" in load_file(sloppy, tmp_path)[0].page_content  # unclosed optional tags nest nothing
