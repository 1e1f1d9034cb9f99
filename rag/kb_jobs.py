"""Long knowledge-base changes as jobs: progress a client can poll (files, chunks, embedded, ETA).

Each job's record is also kept on disk (`<kb_root>/.jobs/<id>.json`, written at every change of state
and when its index version is published), so a job id stays answerable after the manager restarts: a
record a stopped manager left queued or running reads as what it is, interrupted, and says whether its
index version was published before the stop.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rag.kb_store import write_atomically

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
    published_version: int | None = None  # set the moment the build publishes, before the job is done
    interrupted: bool = False  # its manager stopped before it finished
    exception: BaseException | None = field(default=None, repr=False)  # re-raised to a client that waits
    saved: Callable[[Job], None] | None = field(default=None, repr=False)  # the board's writer of the record
    _embed_started: float | None = None

    def progress(self, stage: str, done: int, total: int) -> None:
        """The library's (stage, done, total) callback; called from the build's thread."""
        if stage == "published":
            self.published_version = done
            self.save()
        elif stage == "load":
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
                "finished_at": self.finished_at, "error": self.error, "status": self.status,
                "published_version": self.published_version, "interrupted": self.interrupted, **self.result}

    def save(self) -> None:
        if self.saved is not None:
            self.saved(self)


JOBS_FOLDER = ".jobs"
_JOB_ID = re.compile(r"job-[0-9a-f]{16}")


class JobBoard:
    """The jobs of one manager replica, the newest `keep` of them in memory and on disk per kb_root (a job
    id is for polling, not an archive)."""

    def __init__(self, keep: int = 500) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()

    def create(self, knowledge_base: str, kind: str, kb_root: Path | None = None) -> Job:
        job = Job(f"job-{uuid.uuid4().hex[:16]}", knowledge_base, kind)
        if kb_root is not None:
            job.saved = lambda saved: self._write(kb_root, saved)
            job.save()
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

    def unfinished(self) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs.values() if not job.finished]

    def _write(self, kb_root: Path, job: Job) -> None:
        folder = kb_root / JOBS_FOLDER
        record = {k: v for k, v in job.view().items() if k != "eta_s"}
        write_atomically(folder / f"{job.id}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        if job.finished:
            _forget_oldest(folder, self._keep)

    def recorded(self, kb_root: Path, job_id: str) -> dict[str, Any] | None:
        """A job this replica does not hold, from its record: one that a stopped manager left queued or
        running is interrupted, and its record is rewritten to say so. None when there is no such job."""
        if not _JOB_ID.fullmatch(job_id):
            return None
        path = kb_root / JOBS_FOLDER / f"{job_id}.json"
        try:
            record: dict[str, Any] = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        # A build that published just after its stopping manager recorded it as interrupted counts as done.
        late = record.get("interrupted") and record.get("published_version") is not None \
            and record.get("state") == "failed"
        if record.get("state") in ("queued", "running") or late:
            record = interrupted(record)
            write_atomically(path, json.dumps(record, ensure_ascii=False).encode("utf-8"))
        return {**record, "eta_s": None}


def interrupted(record: dict[str, Any]) -> dict[str, Any]:
    """What a job that its manager stopped before it finished amounts to."""
    version = record.get("published_version")
    if version is not None:  # the index was published; the next writer puts its originals in place
        note = (f"the knowledge-base manager stopped after this job published index version {version}: its "
                "changes are in the index")
        return {**record, "state": "done", "status": 200, "interrupted": True, "index_version": version,
                "published": True, "note": note, "finished_at": record.get("finished_at") or time.time()}
    when = "before it started" if record.get("state") == "queued" else "while it ran"
    error = (f"the knowledge-base manager stopped (a redeploy, make stop or a crash) {when}; nothing of it was "
             "published and the knowledge base is as it was: send the change again")
    return {**record, "state": "failed", "status": 503, "interrupted": True, "error": error,
            "finished_at": record.get("finished_at") or time.time()}


def _forget_oldest(folder: Path, keep: int) -> None:
    records = list(folder.glob("job-*.json"))
    if len(records) <= 2 * keep:  # trimmed in bulk, not on every job
        return
    def age(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed meanwhile
            return 0.0

    for old in sorted(records, key=age)[:len(records) - keep]:
        old.unlink(missing_ok=True)
