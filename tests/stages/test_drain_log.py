"""The one parser of a Serve log message, pinned to Ray 2.60's drain loop: the exact lines it logs, and
the templates in the installed Ray's source, so an upgrade that rewords them fails here."""

from __future__ import annotations

import logging
from pathlib import Path

import ray.serve._private.replica as serve_replica

from deployments.stages.drain_log import SERVE_LOGGER, DrainWatcher, drain_update

# What Ray 2.60's `Replica._drain_ongoing_requests` logs, character for character.
RAY_260_WAITING = ("Waiting for an additional 2s to shut down: 3 ongoing requests, "
                   "0.0s minimum draining period remaining.")
RAY_260_DRAINED = "Drained ongoing requests; shutting down servers."


def test_the_drain_loop_lines_give_the_ongoing_count() -> None:
    assert drain_update(RAY_260_WAITING) == 3
    assert drain_update(RAY_260_WAITING.replace("2s", "0.5s").replace("3 ongoing", "0 ongoing")) == 0
    assert drain_update(RAY_260_DRAINED) == 0


def test_other_lines_are_not_drain_updates() -> None:
    assert drain_update("Started replica.") is None
    assert drain_update("event=DRAINING deployment=Generator version=v1 replica=x in_flight=2") is None
    assert drain_update("note: Waiting for an additional 2s to shut down: 3 ongoing requests") is None


def test_the_installed_ray_logs_these_templates_on_serves_logger() -> None:
    source = Path(serve_replica.__file__).read_text(encoding="utf-8")
    assert 'f"Waiting for an additional {wait_loop_period_s}s to shut down: "' in source
    assert 'f"{num_ongoing_requests} ongoing requests, "' in source
    assert '"Drained ongoing requests; shutting down servers."' in source
    assert serve_replica.logger.name == SERVE_LOGGER
    rendered = (f"Waiting for an additional {2}s to shut down: " f"{5} ongoing requests, "
                f"{max(0.0, -1.0):.1f}s minimum draining " f"period remaining.")
    assert drain_update(rendered) == 5


def test_the_watcher_reports_drains_and_lets_every_record_through() -> None:
    seen: list[int] = []
    watcher = DrainWatcher.attach(seen.append)
    serve_logger = logging.getLogger(SERVE_LOGGER)
    try:
        records = [logging.LogRecord(SERVE_LOGGER, logging.INFO, __file__, 1, text, None, None)
                   for text in (RAY_260_WAITING, "unrelated", RAY_260_DRAINED)]
        assert all(serve_logger.filter(record) for record in records)
    finally:
        serve_logger.removeFilter(watcher)
    assert seen == [3, 0]
