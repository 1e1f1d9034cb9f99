"""What a change to a knowledge base asks for (`Changes`): the record the gateway's routes make and the
KnowledgeBases manager builds from (`rag.kb_build`). Apart from the build, so that making one imports no
parser, splitter or index."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

Source = Path | bytes  # a file to read, or bytes received over HTTP


@dataclass(frozen=True)
class Changes:
    add: dict[str, Source] = field(default_factory=dict)  # new or replaced files, by name
    delete: tuple[str, ...] = ()
    reindex: tuple[str, ...] = ()  # split and embed again from the stored originals
    rescan: bool = False  # the file set is whatever is in content/ now (recreate_vector_store)
    full: bool = False  # embed every chunk again, reusing no vector
    override: bool = True  # False: a file that exists with other content is a conflict
    keep_originals: bool = False  # deleted files leave the index but keep their original (delete_content=false)
    skip_unreadable: bool = False  # a file that cannot be indexed fails alone (BuildResult.failed)
    max_chunks: int | None = None  # more new chunks than this refuse the change before anything is embedded
    spool: Path | None = None  # the folder `add`'s files were streamed to (an upload): removed when the job ends
    refused: dict[str, str] = field(default_factory=dict)  # files of the upload not taken (a type), and why
