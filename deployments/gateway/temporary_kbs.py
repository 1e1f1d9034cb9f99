"""Which temporary knowledge bases (Chatchat's file chat) the manager made, and when each was last used.

A temporary KB is an ordinary KB on disk under a reserved name (`rag.kb_store.is_temporary`), so uploads,
Retrievers and deletion treat it like any other. What makes it temporary is kept here, in the manager's
memory only: a temporary KB on disk that this manager did not make is from before its restart, and goes;
one unused for `idle_ttl_s` goes too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from rag.config import TemporaryKbSettings
from rag.errors import OverloadedError
from rag.kb_store import is_temporary

SWEEP_MAX_INTERVAL_S = 60.0


class TemporaryKbs:
    def __init__(self, settings: TemporaryKbSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._used: dict[str, float] = {}

    @property
    def sweep_interval_s(self) -> float:
        return min(SWEEP_MAX_INTERVAL_S, self.settings.idle_ttl_s / 4)

    def reserve(self, kb: str) -> None:
        """Count `kb` before it is made (two uploads at once cannot both take the last place)."""
        if len(self._used) >= self.settings.max_count:
            raise OverloadedError(f"{len(self._used)} temporary knowledge bases are in use (the limit is "
                                  f"{self.settings.max_count}); retry once one has been idle for "
                                  f"{self.settings.idle_ttl_s:g} s, or reuse one by its id")
        self._used[kb] = self._clock()

    def touch(self, kb: str) -> bool:
        """Mark `kb` used now; False when this manager holds no such temporary KB."""
        if kb not in self._used:
            return False
        self._used[kb] = self._clock()
        return True

    def discard(self, kb: str) -> None:
        self._used.pop(kb, None)

    def __len__(self) -> int:
        return len(self._used)

    def to_delete(self, on_disk: Iterable[str], busy: set[str]) -> dict[str, str]:
        """The temporary KBs on disk to delete, each with why: not made by this manager (it restarted
        since), or idle past the TTL. A KB with a job queued or running is in use, whatever its clock says."""
        now, ttl = self._clock(), self.settings.idle_ttl_s
        found: dict[str, str] = {}
        for kb in on_disk:
            if not is_temporary(kb) or kb in busy:
                continue
            if kb not in self._used:
                found[kb] = "restart"
            elif now - self._used[kb] > ttl:
                found[kb] = "idle"
        return found
