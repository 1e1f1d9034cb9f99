"""An upload's files written to disk as they arrive, one file per part in the upload's spool folder, so
the gateway adds no copy of an upload (Serve's replica keeps the body's messages once, under
`max_upload_bytes`) and the manager is handed paths, not bytes.

Starlette's multipart parser does the parsing; this only swaps the in-memory spool it gives each file
part for a file in the upload's folder, and refuses a file over its size limit the moment it passes it.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from rag import kb_store
from rag.config import KnowledgeBaseSettings
from rag.errors import InvalidRequestError, RequestTooLargeError

MAX_FIELDS = 50  # the form's own fields are a handful (knowledge_base_name, override, chunk_size, ...)


@dataclass(frozen=True)
class Upload:
    fields: dict[str, str]
    files: dict[str, Path]  # the client's file name -> where its bytes are
    refused: dict[str, str]  # files of a type no loader reads -> why: they fail alone (Chatchat's failed_files)


async def receive_upload(request: Request, folder: Path, limits: KnowledgeBaseSettings) -> Upload:
    """The form's fields, and its `files` parts written under `folder`. Refused (400/413) with the
    reason: not multipart, no files, too many, an unsafe or repeated name, a file over `max_file_bytes`.
    A file of a type no loader reads is not a refusal: it fails alone, as an unreadable one does."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise InvalidRequestError("send the upload as multipart/form-data, the files as parts named 'files'")
    parser = _SpoolingParser(request, folder, limits)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequestError(f"invalid multipart upload: {exc.message}") from None
    try:
        fields = {k: v for k, v in form.multi_items() if k != "files" and isinstance(v, str)}
        files, refused = _named_files(form.getlist("files"), parser.paths)
    finally:
        await form.close()
    return Upload(fields, files, refused)


async def discard(folder: Path) -> None:
    await asyncio.to_thread(shutil.rmtree, folder, True)


def _named_files(parts: list[Any], paths: dict[int, Path]) -> tuple[dict[str, Path], dict[str, str]]:
    if not parts:
        raise InvalidRequestError("no files to upload: send them as multipart parts named 'files'")
    files: dict[str, Path] = {}
    refused: dict[str, str] = {}
    for part in parts:
        if not isinstance(part, UploadFile):
            raise InvalidRequestError("each 'files' part must be a file with a file name")
        name = kb_store.check_file_name(part.filename or "", any_type=True)
        # A name sent twice: the later part wins, as a file saved twice over in one folder would.
        if why := kb_store.unsupported_type(name):
            refused[name] = why
        else:
            files[name] = paths[id(part)]
    return files, refused


class _SpoolingParser(MultiPartParser):
    def __init__(self, request: Request, folder: Path, limits: KnowledgeBaseSettings) -> None:
        super().__init__(request.headers, request.stream(), max_files=limits.max_files, max_fields=MAX_FIELDS)
        self.folder = folder
        self.max_file_bytes = limits.max_file_bytes
        self.paths: dict[int, Path] = {}  # id(UploadFile) -> its file in the folder
        self._size = 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        upload = self._current_part.file
        if upload is None:  # a plain field: Starlette keeps it (at most max_part_size) in memory
            return
        path = self.folder / f"{len(self.paths):05d}"
        spooled, upload.file = upload.file, path.open("w+b")  # opening an empty file: no wait worth a thread
        spooled.close()
        self._files_to_close_on_error[-1] = upload.file  # type: ignore[call-overload]  # a real file, not spooled
        self.paths[id(upload)] = path
        self._size = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        upload = self._current_part.file
        if upload is not None:
            self._size += end - start
            if self._size > self.max_file_bytes:
                raise RequestTooLargeError(f"file {str(upload.filename)[:80]!r} is larger than the "
                                           f"{self.max_file_bytes}-byte limit")
        super().on_part_data(data, start, end)
