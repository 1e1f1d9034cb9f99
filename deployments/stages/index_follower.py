"""The Retriever replica's background loop that keeps followed knowledge bases on their newest index version."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

from rag.retrieval import Change

logger = logging.getLogger("rag.retrieval")

_NOT_IN_READER_ID = re.compile(r"[^A-Za-z0-9_.-]")


def reader_id_for(app: str, replica: str) -> str:
    """A lease reader id naming this replica: its application (the pipeline version) and Serve's unique id."""
    # Prefixed, so no part of it can make a leading dot (a hidden, temporary name in the leases folder).
    return _NOT_IN_READER_ID.sub("_", f"r-{app}.{replica}")[:128]


async def follow_forever(refresh: Callable[[], list[Change]], interval_s: float,
                         on_change: Callable[[Change], None]) -> None:
    """Run `refresh` in a worker thread every `interval_s`, reporting each change, until cancelled.

    Never dies of an error: a failed refresh is logged and tried again on the next tick, since a
    replica that stopped refreshing would also stop renewing its leases.
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            changes = await asyncio.to_thread(refresh)
        except Exception:
            logger.exception("refreshing the knowledge-base indexes failed; trying again in %.1f s", interval_s)
            continue
        for change in changes:
            try:
                on_change(change)
            except Exception:
                logger.exception("reporting index change %s failed", change)
