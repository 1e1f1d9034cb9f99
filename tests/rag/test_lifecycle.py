"""Structured lifecycle log lines and in-flight request accounting."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rag.lifecycle import EventFile, InFlight, LifecycleLog, read_events


def test_event_line_format() -> None:
    log = LifecycleLog("Embedder", "v1", "abc123")
    line = log.event("READY", load_s=3.2, batch=32, note="warm up done", empty="", ok=True)
    assert line == ('event=READY deployment=Embedder version=v1 replica=abc123 load_s=3.200 batch=32 '
                    'note="warm up done" empty="" ok=True')


def test_event_without_fields_and_float_rounding() -> None:
    log = LifecycleLog("Gateway", "v2", "r-1")
    assert log.event("STARTUP") == "event=STARTUP deployment=Gateway version=v2 replica=r-1"
    assert log.event("CLEANUP", freed_s=0.00049, big=1234.56789).endswith("freed_s=0.000 big=1234.568")


def test_event_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rag.lifecycle")
    line = LifecycleLog("Pipeline", "v1", "x").event("DRAINING", in_flight=2)
    assert [r.getMessage() for r in caplog.records] == [line]
    assert caplog.records[0].name == "rag.lifecycle"
    assert caplog.records[0].levelno == logging.INFO


def test_first_traffic_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rag.lifecycle")
    log = LifecycleLog("Retriever", "v3", "r9")
    for _ in range(5):
        log.first_traffic()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("event=TRAFFIC deployment=Retriever version=v3 replica=r9 since_start_s=")
    since = float(messages[0].rsplit("since_start_s=", 1)[1])
    assert 0 <= since < 60


def test_first_traffic_is_per_replica(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rag.lifecycle")
    LifecycleLog("Generator", "v1", "a").first_traffic()
    LifecycleLog("Generator", "v1", "b").first_traffic()
    assert [r.getMessage().split()[3] for r in caplog.records] == ["replica=a", "replica=b"]


def test_in_flight_counts_up_and_down() -> None:
    flight = InFlight()
    assert flight.count == 0
    with flight.track():
        assert flight.count == 1
        with flight.track():
            assert flight.count == 2
        assert flight.count == 1
    assert flight.count == 0


def test_in_flight_decrements_on_exception() -> None:
    flight = InFlight()
    with pytest.raises(RuntimeError, match="boom"), flight.track():
        assert flight.count == 1
        raise RuntimeError("boom")
    assert flight.count == 0


def test_events_go_to_the_event_file_as_json(tmp_path: Path) -> None:
    seen: list[str] = []
    log = LifecycleLog("Generator", "v2", "r7", sink=EventFile(tmp_path / "events.jsonl"), on_event=seen.append)
    log.event("STARTUP", loads="the model")
    log.event("DRAINING", in_flight=2)
    events = read_events(tmp_path / "events.jsonl")
    assert [(e["event"], e["deployment"], e["version"], e["replica"]) for e in events] == [
        ("STARTUP", "Generator", "v2", "r7"), ("DRAINING", "Generator", "v2", "r7")]
    assert events[0]["loads"] == "the model" and events[1]["in_flight"] == 2
    assert events[0]["ts"] <= events[1]["ts"]
    assert seen == ["STARTUP", "DRAINING"]


def test_a_full_event_file_moves_aside_and_both_are_read(tmp_path: Path) -> None:
    sink = EventFile(tmp_path / "events.jsonl", max_bytes=200)
    for n in range(6):
        sink.write({"event": "READY", "n": n, "pad": "x" * 40})
    assert (tmp_path / "events.jsonl.1").exists()
    assert (tmp_path / "events.jsonl").stat().st_size <= 200
    numbers = [e["n"] for e in read_events(tmp_path / "events.jsonl")]
    assert numbers == sorted(numbers) and numbers[-1] == 5


def test_an_unwritable_event_file_warns_once_and_never_raises(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    sink = EventFile(tmp_path / "a_file" / "events.jsonl")
    with caplog.at_level(logging.WARNING, logger="rag.lifecycle"):
        sink.write({"event": "READY"})
        sink.write({"event": "TRAFFIC"})
    assert [r.getMessage().split()[0] for r in caplog.records] == ["event=EVENT_FILE_UNWRITABLE"]


def test_no_event_file_writes_nothing(tmp_path: Path) -> None:
    EventFile(None).write({"event": "READY"})
    assert read_events(tmp_path / "missing.jsonl") == []
