"""Structured lifecycle events and in-flight accounting shared by every stage.

Each event is one log line, `event=READY deployment=Embedder version=v1 replica=abc load_s=3.20`, so an
operator can grep a rollout, and one JSON object appended to the node's event file
(`RAG_LIFECYCLE_EVENTS`), so a log shipper or a test reads them without parsing text. Order per replica:
STARTUP, READY, TRAFFIC, SHUTDOWN, DRAINING, CLEANUP.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rag.constants import LIFECYCLE_EVENTS_FILE, resolve_path

logger = logging.getLogger("rag.lifecycle")
MAX_EVENT_FILE_BYTES = 16 * 1024 * 1024  # then the file moves to `<name>.1` (one old file kept)


class EventFile:
    """Appends events as JSON lines to one file that every replica on the node shares: each line is one
    `O_APPEND` write, which the kernel does not interleave with another process's. A file that cannot be
    written costs a warning, never the replica."""

    def __init__(self, path: Path | None, max_bytes: int = MAX_EVENT_FILE_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._warned = False

    @classmethod
    def configured(cls) -> EventFile:
        off = LIFECYCLE_EVENTS_FILE.strip().lower() in ("", "off")
        return cls(None if off else resolve_path(LIFECYCLE_EVENTS_FILE))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("event=EVENT_FILE_UNWRITABLE path=%s error=%r", self.path, exc)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events in an event file (and its rotated predecessor), oldest first; torn lines are skipped."""
    found: list[dict[str, Any]] = []
    for part in (path.with_name(path.name + ".1"), path):
        if not part.exists():
            continue
        for line in part.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


class LifecycleLog:
    """Emits the lifecycle events of one replica, each tagged with who emits it."""

    def __init__(self, deployment: str, version: str, replica: str, sink: EventFile | None = None,
                 on_event: Callable[[str], None] | None = None) -> None:
        self.tags = {"deployment": deployment, "version": version, "replica": replica}
        self._served_first = False
        self.started = time.monotonic()
        self._sink = sink if sink is not None else EventFile.configured()
        self._on_event = on_event

    def event(self, name: str, **fields: Any) -> str:
        record = {"event": name, **self.tags, **fields}
        line = " ".join(f"{k}={_format(v)}" for k, v in record.items())
        logger.info(line)
        self._sink.write({"ts": time.time(), **record})
        if self._on_event is not None:
            self._on_event(name)
        return line

    def first_traffic(self) -> None:
        if not self._served_first:
            self._served_first = True
            self.event("TRAFFIC", since_start_s=time.monotonic() - self.started)


class InFlight:
    """Counts requests in progress, so a stopping replica can report its drain; `on_change` sees
    every new count (a metrics gauge, say)."""

    def __init__(self, on_change: Callable[[int], None] | None = None) -> None:
        self.count = 0
        self._on_change = on_change

    @contextmanager
    def track(self) -> Iterator[None]:
        self._set(self.count + 1)
        try:
            yield
        finally:
            self._set(self.count - 1)

    def _set(self, count: int) -> None:
        self.count = count
        if self._on_change is not None:
            self._on_change(count)
