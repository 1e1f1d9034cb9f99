"""Load knowledge-base files into LangChain `Document`s with source metadata, and split them.

Every document carries `source` (its path relative to the knowledge-base folder), plus `page`
(PDF) or `row` (CSV, JSON, JSONL) where the file has such units, so an answer can cite them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import docx
import html2text
from docx.document import Document as DocxDocument
from docx.table import Table
from langchain_core.documents import Document
from langchain_text_splitters import RecursiveCharacterTextSplitter
from pypdf import PdfReader

from rag.config import SplitterConfig
from rag.errors import UnsupportedDocumentError

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".csv", ".json", ".jsonl"})

# Sentence ends of Chinese and English first, so chunks break between sentences before words.
SEPARATORS = ["\n\n", "\n", "。", "！", "？", "；", ". ", "! ", "? ", "; ", "，", ", ", " ", ""]

# Chinese corpora are often saved as GBK/GB18030 rather than UTF-8; gb18030 is a superset of GBK.
_TEXT_ENCODINGS = ("utf-8-sig", "gb18030")

def _error(path: Path, reason: str) -> UnsupportedDocumentError:
    return UnsupportedDocumentError(f"{path}: {reason}")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    for encoding in _TEXT_ENCODINGS:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise _error(path, f"cannot decode text as any of {', '.join(_TEXT_ENCODINGS)}")


def _doc(text: str, metadata: dict[str, Any], **extra: Any) -> Document:
    return Document(page_content=text.strip(), metadata={**metadata, **extra})


def _single(text: str, metadata: dict[str, Any], **extra: Any) -> list[Document]:
    return [_doc(text, metadata, **extra)] if text.strip() else []


def _load_text(path: Path, metadata: dict[str, Any]) -> list[Document]:
    return _single(_read_text(path), metadata)


class _TitleParser(HTMLParser):
    """Collects the text of the first <title> element; html2text drops the <head>."""

    def __init__(self) -> None:
        super().__init__()
        self._inside = False
        self.title = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._inside = tag == "title" and not self.title

    def handle_endtag(self, tag: str) -> None:
        self._inside = False

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.title += data


def _load_html(path: Path, metadata: dict[str, Any]) -> list[Document]:
    markup = _read_text(path)
    converter = html2text.HTML2Text()
    # Link targets, image names and emphasis markers are noise in retrieved passages.
    converter.ignore_links = converter.ignore_images = converter.ignore_emphasis = True
    converter.body_width = 0  # hard wrapping would split sentences across lines
    titles = _TitleParser()
    titles.feed(markup)
    title = " ".join(titles.title.split())
    return _single(converter.handle(markup), metadata, **({"title": title} if title else {}))


def _load_pdf(path: Path, metadata: dict[str, Any]) -> list[Document]:
    # pypdf raises many unrelated exception types on damaged or encrypted files.
    try:
        pages = [page.extract_text() or "" for page in PdfReader(path).pages]
    except Exception as exc:
        raise _error(path, f"cannot read PDF ({type(exc).__name__}: {exc})") from exc
    return [_doc(text, metadata, page=number)
            for number, text in enumerate(pages, start=1) if text.strip()]


def _docx_lines(document: DocxDocument) -> Iterable[str]:
    # iter_inner_content keeps paragraphs and tables in reading order.
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                # A merged cell appears once per grid column it spans; keep it once.
                cells = list(dict.fromkeys(cell.text.strip() for cell in row.cells))
                yield " | ".join(cell for cell in cells if cell)
        else:
            yield block.text


def _load_docx(path: Path, metadata: dict[str, Any]) -> list[Document]:
    # python-docx surfaces zip, XML and package errors as different exception types.
    try:
        lines = list(_docx_lines(docx.Document(str(path))))
    except Exception as exc:
        raise _error(path, f"cannot read DOCX ({type(exc).__name__}: {exc})") from exc
    return _single("\n".join(line for line in lines if line.strip()), metadata)


def _render(value: Any) -> str:
    """Text of a JSON/CSV value: mappings become `key: value` lines, lists one line per item."""
    if isinstance(value, dict):
        lines = (f"{key}: {_render(item)}" for key, item in value.items() if item not in (None, ""))
        return "\n".join(lines)
    if isinstance(value, list):
        return "\n".join(_render(item) for item in value)
    return "" if value is None else str(value)


def _load_csv(path: Path, metadata: dict[str, Any]) -> list[Document]:
    try:
        rows = list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    except csv.Error as exc:
        raise _error(path, f"malformed CSV ({exc})") from exc
    # Cells beyond the header arrive under the key None; name them rather than lose them.
    texts = (_render({("extra" if k is None else k): v for k, v in row.items()}) for row in rows)
    return [_doc(text, metadata, row=number)
            for number, text in enumerate(texts, start=1) if text.strip()]


def _load_json(path: Path, metadata: dict[str, Any]) -> list[Document]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise _error(path, f"invalid JSON ({exc})") from exc
    if isinstance(data, list):
        return [_doc(text, metadata, row=number)
                for number, text in enumerate(map(_render, data), start=1) if text.strip()]
    return _single(_render(data), metadata)


def _load_jsonl(path: Path, metadata: dict[str, Any]) -> list[Document]:
    documents = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = _render(json.loads(line))
        except json.JSONDecodeError as exc:
            raise _error(path, f"invalid JSON on line {number} ({exc})") from exc
        if text.strip():
            documents.append(_doc(text, metadata, row=number))
    return documents


_LOADERS: dict[str, Callable[[Path, dict[str, Any]], list[Document]]] = {
    ".txt": _load_text, ".md": _load_text, ".markdown": _load_text,
    ".html": _load_html, ".htm": _load_html, ".pdf": _load_pdf, ".docx": _load_docx,
    ".csv": _load_csv, ".json": _load_json, ".jsonl": _load_jsonl,
}


def load_file(path: Path, root: Path | None = None) -> list[Document]:
    """Documents of one file, with `source` relative to `root` (or the file name without one).

    Raises `UnsupportedDocumentError` for an unknown suffix or unreadable content; an empty
    file gives an empty list. `row` (CSV/JSON/JSONL) and `page` (PDF) are 1-based.
    """
    path = Path(path)
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise _error(path, f"unsupported file type {path.suffix or '(none)'!r}; supported: {supported}")
    source = path.resolve().relative_to(Path(root).resolve()).as_posix() if root is not None else path.name
    if path.stat().st_size == 0:
        return []
    return loader(path, {"source": source})


def iter_files(root: Path) -> list[Path]:
    """Supported files under `root`, recursively and sorted, skipping hidden files and folders."""
    root = Path(root)
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [Path(folder, name) for name in names
                  if not name.startswith(".") and Path(name).suffix.lower() in SUPPORTED_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_directory(root: Path) -> list[Document]:
    """Documents of every supported file under `root`; loader errors propagate to the caller."""
    return [doc for path in iter_files(root) for doc in load_file(path, root)]


def build_splitter(cfg: SplitterConfig) -> RecursiveCharacterTextSplitter:
    """A character-length splitter that prefers paragraph, then sentence, then word breaks."""
    return RecursiveCharacterTextSplitter(
        separators=SEPARATORS,
        keep_separator="end",  # a sentence keeps its terminator instead of the next one starting with it
        chunk_size=cfg.chunk_size, chunk_overlap=cfg.chunk_overlap,
        length_function=len, add_start_index=True,
    )


def split_documents(documents: Iterable[Document], cfg: SplitterConfig) -> list[Document]:
    """Chunks of the documents, each with `chunk` (0-based within its document) and `start_index`."""
    splitter = build_splitter(cfg)
    chunks: list[Document] = []
    for document in documents:
        pieces = splitter.create_documents([document.page_content], [document.metadata])
        # The splitter strips each chunk itself (so `start_index` points at the stripped text).
        kept = [piece for piece in pieces if piece.page_content]
        for number, piece in enumerate(kept):
            piece.metadata["chunk"] = number
        chunks += kept
    return chunks


def content_fingerprint(files: list[Path], root: Path) -> str:
    """SHA-256 over the files' relative paths and bytes: changes exactly when the content does."""
    root = Path(root).resolve()
    named = sorted((Path(f).resolve().relative_to(root).as_posix(), Path(f)) for f in files)
    total = hashlib.sha256()
    for relative, path in named:
        encoded = relative.encode("utf-8")
        # Length-prefixing the name keeps ("ab", "c") and ("a", "bc") from hashing alike.
        total.update(len(encoded).to_bytes(8, "big") + encoded)
        with open(path, "rb") as fh:
            total.update(hashlib.file_digest(fh, "sha256").digest())
    return total.hexdigest()
