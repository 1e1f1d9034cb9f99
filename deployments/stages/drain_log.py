"""The one place this project reads a Ray Serve log message: the drain loop's.

Serve drains a stopping replica itself (no new requests, wait for the ongoing ones, then `__del__`) and
gives user code no callback when the drain starts. Its drain loop (`Replica._drain_ongoing_requests` in
`ray/serve/_private/replica.py`) logs one line per check:

    Waiting for an additional 2s to shut down: 3 ongoing requests, 0.0s minimum draining period remaining.
    Drained ongoing requests; shutting down servers.

`drain_update` turns such a line into the number of requests still ongoing (0 once drained). The exact
strings are Ray 2.60's, pinned by a test against the installed Ray's source; should a Ray upgrade change
them, nothing here matches and the replica still reports its drain from its own count when Serve calls
`__del__` (`ReplicaLifecycle.stop`), only later.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

SERVE_LOGGER = "ray.serve"
WAITING = re.compile(r"^Waiting for an additional [\d.]+s to shut down: (\d+) ongoing requests")
DRAINED = "Drained ongoing requests"


def drain_update(message: str) -> int | None:
    """Requests still ongoing according to one drain-loop line (0: drained); None for any other line."""
    if match := WAITING.match(message):
        return int(match.group(1))
    if message.startswith(DRAINED):
        return 0
    return None


class DrainWatcher(logging.Filter):
    """A filter, not a handler, on Serve's logger: Serve clears that logger's handlers whenever it
    reconfigures a replica's logging (a `serve deploy` of a changed config can), but keeps its filters."""

    def __init__(self, on_drain: Callable[[int], None]) -> None:
        super().__init__()
        self._on_drain = on_drain

    def filter(self, record: logging.LogRecord) -> bool:
        ongoing = drain_update(record.getMessage())
        if ongoing is not None:
            self._on_drain(ongoing)
        return True

    @classmethod
    def attach(cls, on_drain: Callable[[int], None]) -> DrainWatcher:
        watcher = cls(on_drain)
        logging.getLogger(SERVE_LOGGER).addFilter(watcher)
        return watcher
