"""A loaded index that searches share, retired by a swap and closed only when its last search is done."""

from __future__ import annotations

import threading

from rag.errors import ServiceUnavailableError
from rag.index import KnowledgeBaseIndex


class SharedIndex:
    """Counts the searches using one `KnowledgeBaseIndex`, so a swap never closes it under a running one.

    `retire` marks it replaced: it closes at once when idle, else the last `release` closes it.
    Callers must make the lookup that finds this object and `acquire` one atomic step with respect
    to the swap that retires it (the Retriever does both under its lock); `acquire` refuses a
    retired index as a last line of defence.
    """

    def __init__(self, index: KnowledgeBaseIndex) -> None:
        self.index = index
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self.index.version

    @property
    def users(self) -> int:
        return self._users

    def acquire(self) -> KnowledgeBaseIndex:
        with self._lock:
            if self._retired:
                raise ServiceUnavailableError(f"index {self.index.directory} was replaced; retry the search")
            self._users += 1
            return self.index

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self.index.close()

    def retire(self) -> None:
        with self._lock:
            already, self._retired = self._retired, True
            close = not already and self._users == 0
        if close:
            self.index.close()
