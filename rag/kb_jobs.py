"""Long knowledge-base changes as jobs: progress a client can poll (files, chunks, embedded, ETA)."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

JobState = Literal["queued", "running", "done", "failed"]


# The spool and trash folders a build works in: internal names a client has no use for.
_WORK_FOLDER = re.compile(r"\.(?:incoming|deleted)-[^/\s]*/")


def without_server_paths(text: str, kb_root: Path) -> str:
    """`text` with every path under `kb_root` made relative to it and the build's work folders dropped, so
    a job view or a 4xx message names the knowledge base's file, never where the server keeps it."""
    for prefix in sorted({str(kb_root), str(kb_root.resolve())}, key=len, reverse=True):
        text = text.replace(prefix.rstrip(os.sep) + os.sep, "")
    return _WORK_FOLDER.sub("", text)


@dataclass
class Job:
    id: str
    knowledge_base: str
    kind: str
    state: JobState = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    files_total: int = 0
    files_done: int = 0
    chunks_total: int = 0
    chunks_embedded: int = 0
    error: str | None = None
    status: int = 202  # the HTTP status the job's outcome maps to, once finished
    result: dict[str, Any] = field(default_factory=dict)
    exception: BaseException | None = field(default=None, repr=False)  # re-raised to a client that waits
    _embed_started: float | None = None

    def progress(self, stage: str, done: int, total: int) -> None:
        """The library's (stage, done, total) callback; called from the build's thread."""
        if stage == "load":
            self.files_done, self.files_total = done, total
        elif stage == "embed":
            if self._embed_started is None:
                self._embed_started = time.monotonic()
            self.chunks_embedded, self.chunks_total = done, total

    def eta_s(self) -> float | None:
        """Seconds left at the embedding rate so far (embedding dominates a build); None before a rate."""
        if self.state != "running" or self._embed_started is None or not self.chunks_embedded:
            return None
        rate = self.chunks_embedded / max(time.monotonic() - self._embed_started, 1e-6)
        return round((self.chunks_total - self.chunks_embedded) / rate, 1)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def view(self) -> dict[str, Any]:
        return {"job_id": self.id, "knowledge_base_name": self.knowledge_base, "kind": self.kind,
                "state": self.state, "files_total": self.files_total, "files_done": self.files_done,
                "chunks_total": self.chunks_total, "chunks_embedded": self.chunks_embedded,
                "eta_s": self.eta_s(), "created_at": self.created_at, "started_at": self.started_at,
                "finished_at": self.finished_at, "error": self.error, "status": self.status, **self.result}


class JobBoard:
    """The jobs of one manager replica, the newest `keep` of them (a job id is for polling, not an archive)."""

    def __init__(self, keep: int = 500) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()

    def create(self, knowledge_base: str, kind: str) -> Job:
        job = Job(f"job-{uuid.uuid4().hex[:16]}", knowledge_base, kind)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:
                oldest = next(iter(self._jobs))
                if not self._jobs[oldest].finished:
                    break
                self._jobs.popitem(last=False)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)
