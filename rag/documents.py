"""Load knowledge-base files into LangChain `Document`s with source metadata, and split them.

Every document carries `source` (its path relative to the knowledge-base folder), plus `page`
(PDF) or `row` (CSV, JSON, JSONL) where the file has such units, so an answer can cite them.

Only regular files inside the folder are read: a FIFO, socket or device, a broken symlink or a
symlink that leads out of the folder is refused with `UnsupportedDocumentError` naming it, before
anything is opened. Refusing (rather than skipping) fails closed: an index silently missing a file
the operator put there would answer from partial knowledge. Files over a size limit and JSON nested
deeper than `MAX_JSON_DEPTH` are refused the same way.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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
from rag.file_types import SUPPORTED_SUFFIXES

# Sentence ends of Chinese and English first, so chunks break between sentences before words.
SEPARATORS = ["\n\n", "\n", "。", "！", "？", "；", ". ", "! ", "? ", "; ", "，", ", ", " ", ""]

# Chinese corpora are often saved as GBK/GB18030 rather than UTF-8; gb18030 is a superset of GBK.
_TEXT_ENCODINGS = ("utf-8-sig", "gb18030")

DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024  # whole files are read into memory; far above any sane document
# Real documents nest a handful of levels; the limit keeps parsing and rendering far from Python's
# recursion limit (about 1000 frames, and rendering takes two per level).
MAX_JSON_DEPTH = 64
# html2text's cost grows with the square of the nesting (60 KB of unclosed <ol><li> took it 50 s); real
# pages nest a few dozen elements.
MAX_MARKUP_DEPTH = 512
MAX_UNPACKED_BYTES = 256 * 1024 * 1024  # a DOCX's zip entries, all together: a zip bomb is refused unread
MAX_ZIP_ENTRIES = 10_000
MAX_PDF_PAGES = 2_000
# Elements that are never open around others (void ones), or that a browser closes by itself: they do not
# deepen the nesting even when left unclosed, which sloppy pages do all the time.
_NOT_NESTING = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr",
    "p", "li", "dt", "dd", "tr", "td", "th", "option", "optgroup", "thead", "tbody", "tfoot", "colgroup",
    "caption", "rb", "rt", "rp", "html", "head", "body"})

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _error(path: Path, reason: str) -> UnsupportedDocumentError:
    return UnsupportedDocumentError(f"{path}: {reason}")


def _refusal(path: Path, real_root: Path | None) -> str | None:
    """Why `path` must not be read (as a document of `real_root`, when given), or None. Opens nothing."""
    try:
        target = path.resolve(strict=True)
        mode = target.stat().st_mode
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on Python 3.11
        return f"cannot be resolved ({type(exc).__name__}), e.g. a broken symlink"
    if real_root is not None and not target.is_relative_to(real_root):
        return "is a symlink leading outside the source folder"
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
        return f"is {kind}, not a regular file"
    return None


@contextmanager
def _open_regular(path: Path) -> Iterator[io.BufferedReader]:
    # O_NONBLOCK: should a FIFO be swapped in after the checks, opening it returns at once instead of
    # waiting for a writer; fstat then checks the very file opened.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _error(path, "is not a regular file")
        yield fh


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    with _open_regular(path) as fh:
        data = fh.read(max_bytes + 1)  # one byte more tells a file over the limit, even a growing one
    if len(data) > max_bytes:
        raise _error(path, f"larger than the {max_bytes}-byte limit for one document")
    return data


def copy_document(path: Path, target: Path, max_bytes: int) -> str:
    """Copy `path` to `target` a block at a time (an upload's file is never held whole in memory);
    returns its sha256. Over `max_bytes` it fails, as reading it would."""
    digest, size = hashlib.sha256(), 0
    with _open_regular(path) as source, open(target, "wb") as out:
        while block := source.read(_COPY_BLOCK):
            size += len(block)
            if size > max_bytes:
                raise _error(path, f"larger than the {max_bytes}-byte limit for one document")
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


_COPY_BLOCK = 1024 * 1024


def _decode(data: bytes, path: Path) -> str:
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


def _load_text(data: bytes, path: Path, metadata: dict[str, Any]) -> list[Document]:
    return _single(_decode(data, path), metadata)


class _TooDeep(Exception):
    pass


class _MarkupScan(HTMLParser):
    """Collects the text of the first <title> element (html2text drops the <head>) and refuses markup
    nested deeper than `MAX_MARKUP_DEPTH`, before html2text ever sees it."""

    def __init__(self) -> None:
        super().__init__()
        self._inside = False
        self._open: list[str] = []
        self.title = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._inside = tag == "title" and not self.title
        if tag not in _NOT_NESTING:
            self._open.append(tag)
            if len(self._open) > MAX_MARKUP_DEPTH:
                raise _TooDeep

    def handle_endtag(self, tag: str) -> None:
        self._inside = False
        if tag in self._open:  # an end tag closes whatever was left open inside its element
            del self._open[len(self._open) - 1 - self._open[::-1].index(tag):]

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.title += data


def _load_html(data: bytes, path: Path, metadata: dict[str, Any]) -> list[Document]:
    markup = _decode(data, path)
    scan = _MarkupScan()
    try:
        scan.feed(markup)
        scan.close()
    except _TooDeep:
        raise _error(path, f"markup nested deeper than {MAX_MARKUP_DEPTH} elements") from None
    converter = html2text.HTML2Text()
    # Link targets, image names and emphasis markers are noise in retrieved passages.
    converter.ignore_links = converter.ignore_images = converter.ignore_emphasis = True
    converter.body_width = 0  # hard wrapping would split sentences across lines
    title = " ".join(scan.title.split())
    return _single(converter.handle(markup), metadata, **({"title": title} if title else {}))


def _load_pdf(data: bytes, path: Path, metadata: dict[str, Any]) -> list[Document]:
    # pypdf raises many unrelated exception types on damaged or encrypted files.
    try:
        reader = PdfReader(io.BytesIO(data))
        if len(reader.pages) > MAX_PDF_PAGES:
            raise _error(path, f"has {len(reader.pages)} pages; the limit for one document is {MAX_PDF_PAGES}")
        pages = [page.extract_text() or "" for page in reader.pages]
    except UnsupportedDocumentError:
        raise
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


def _check_zip(data: bytes, path: Path) -> None:
    """Refuses an archive whose entries would unpack past the limits, from its directory alone. The
    sizes it declares are the ones zipfile then holds each entry to."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise _error(path, f"cannot read DOCX ({type(exc).__name__}: {exc})") from exc
    unpacked = sum(entry.file_size for entry in entries)
    if len(entries) > MAX_ZIP_ENTRIES or unpacked > MAX_UNPACKED_BYTES:
        raise _error(path, f"unpacks to more than the limit for one document ({len(entries)} entries, "
                           f"{unpacked} bytes; the limits are {MAX_ZIP_ENTRIES} entries and "
                           f"{MAX_UNPACKED_BYTES} bytes)")


def _load_docx(data: bytes, path: Path, metadata: dict[str, Any]) -> list[Document]:
    _check_zip(data, path)
    # python-docx surfaces zip, XML and package errors as different exception types.
    try:
        lines = list(_docx_lines(docx.Document(io.BytesIO(data))))
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


def _load_csv(data: bytes, path: Path, metadata: dict[str, Any]) -> list[Document]:
    try:
        rows = list(csv.DictReader(io.StringIO(_decode(data, path), newline="")))
    except csv.Error as exc:
        raise _error(path, f"malformed CSV ({exc})") from exc
    # Cells beyond the header arrive under the key None; name them rather than lose them.
    texts = (_render({("extra" if k is None else k): v for k, v in row.items()}) for row in rows)
    return [_doc(text, metadata, row=number)
            for number, text in enumerate(texts, start=1) if text.strip()]


def _parse_json(text: str, path: Path, where: str = "") -> Any:
    too_deep = _error(path, f"JSON{where} nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(path, f"invalid JSON{where} ({exc})") from exc
    except RecursionError:  # the parser itself recurses per level
        raise too_deep from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def _depth(value: Any) -> int:
    """Nesting depth of lists and dicts (a scalar is 0), measured without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _load_json(data: bytes, path: Path, metadata: dict[str, Any]) -> list[Document]:
    value = _parse_json(_decode(data, path), path)
    if isinstance(value, list):
        return [_doc(text, metadata, row=number)
                for number, text in enumerate(map(_render, value), start=1) if text.strip()]
    return _single(_render(value), metadata)


def _load_jsonl(data: bytes, path: Path, metadata: dict[str, Any]) -> list[Document]:
    documents = []
    for number, line in enumerate(_decode(data, path).splitlines(), start=1):
        if not line.strip():
            continue
        text = _render(_parse_json(line, path, f" on line {number}"))
        if text.strip():
            documents.append(_doc(text, metadata, row=number))
    return documents


_LOADERS: dict[str, Callable[[bytes, Path, dict[str, Any]], list[Document]]] = {
    ".txt": _load_text, ".md": _load_text, ".markdown": _load_text,
    ".html": _load_html, ".htm": _load_html, ".pdf": _load_pdf, ".docx": _load_docx,
    ".csv": _load_csv, ".json": _load_json, ".jsonl": _load_jsonl,
}


def load_file(path: Path, root: Path | None = None, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[Document]:
    """Documents of one file, with `source` relative to `root` (or the file name without one).

    Raises `UnsupportedDocumentError` for an unknown suffix, unreadable content, a file that is not
    regular, leads outside `root` or exceeds `max_bytes`; an empty file gives an empty list.
    `row` (CSV/JSON/JSONL) and `page` (PDF) are 1-based.
    """
    path = Path(path)
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise _error(path, f"unsupported file type {path.suffix or '(none)'!r}; supported: {supported}")
    reason = _refusal(path, Path(root).resolve() if root is not None else None)
    if reason:
        raise _error(path, reason)
    source = _source_name(path, root) if root is not None else path.name
    data = _read_bytes(path, max_bytes)
    return loader(data, path, {"source": source}) if data else []


def _source_name(path: Path, root: Path) -> str:
    # Lexical first: a symlink inside the folder is cited by its own name, not its target's. Resolved
    # when the two were spelt through different links (a checked file always resolves inside root).
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()


def iter_files(root: Path) -> list[Path]:
    """Supported files under `root`, recursively and sorted, skipping hidden files and folders.

    Raises `UnsupportedDocumentError` naming every entry that must not be read (see the module
    docstring). A symlink to a file that is listed anyway is dropped, so no content is indexed twice.
    """
    root = Path(root)
    found, refused = [], []
    for path, reason in _walk(root):
        if reason:
            refused.append(f"{_source_name(path, root)} {reason}")
        else:
            found.append(path)
    if refused:
        refused.sort()  # os.walk order is the file system's; the message should not vary
        more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
        raise UnsupportedDocumentError(f"{root}: refusing {'; '.join(refused[:3])}{more}")
    return _without_duplicate_links(sorted(found, key=lambda p: _source_name(p, root)))


def _walk(root: Path) -> Iterator[tuple[Path, str | None]]:
    """(candidate file, why it is refused or None) for every supported name under `root`."""
    real_root = root.resolve()
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        # os.walk does not descend into linked folders: one inside is walked under its real path,
        # one leading outside is refused like a file.
        for name in subfolders:
            path = Path(folder, name)
            if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                yield path, "is a symlink leading outside the source folder"
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower() in SUPPORTED_SUFFIXES:
                yield Path(folder, name), _refusal(Path(folder, name), real_root)


def _without_duplicate_links(paths: list[Path]) -> list[Path]:
    real = {p.resolve() for p in paths if not p.is_symlink()}
    kept, seen = [], set()
    for path in paths:
        target = path.resolve()
        if path.is_symlink() and (target in real or target in seen):
            continue
        seen.add(target)
        kept.append(path)
    return kept


def load_directory(root: Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[Document]:
    """Documents of every supported file under `root`; loader errors propagate to the caller."""
    return [doc for path in iter_files(root) for doc in load_file(path, root, max_bytes=max_bytes)]


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
    named = sorted((_source_name(Path(f), root), Path(f)) for f in files)
    total = hashlib.sha256()
    for relative, path in named:
        encoded = relative.encode("utf-8")
        # Length-prefixing the name keeps ("ab", "c") and ("a", "bc") from hashing alike.
        total.update(len(encoded).to_bytes(8, "big") + encoded)
        with _open_regular(path) as fh:
            total.update(hashlib.file_digest(fh, "sha256").digest())
    return total.hexdigest()
