"""A rollout interrupted (killed, Ctrl-C, a second start, an abort from another process) and its status:
abort and resume in every state, the lock, files that never show a half-written state."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from control.document import ServeDocument
from control.rollout import Rollout, RolloutBusyError
from rag.auth import create_key_file
from rag.errors import InvalidRequestError
from tests.control.rollout_fakes import (
    FakeCluster,
    Killed,
    assert_as_before,
    make,
    start_v2,
)


def test_an_interrupted_start_can_be_aborted_or_resumed(config: Path) -> None:
    before = config.read_text()
    cluster = FakeCluster(start_polls=3)
    rollout = make(config, cluster)

    def killed() -> None:
        raise Killed  # a killed process: no rollback ran

    cluster.on_serving = killed
    with pytest.raises(Killed):
        start_v2(rollout)
    state = rollout.load_state()
    assert state and state.status == "running" and state.phase == "starting"
    assert "v2" in cluster.apps  # stranded, for now
    cluster.on_serving = None
    status = rollout.status()
    assert status["rollout"]["status"] == "running" and status["agree"]

    cluster.on_serving = None
    assert rollout.start("v2", resume=True) == "promoted"

    ServeDocument.from_text(before).save(config)
    cluster.deploy(ServeDocument.load(config).plain())
    rollout.state_path.unlink()
    cluster.on_serving = killed
    with pytest.raises(Killed):
        start_v2(rollout)
    cluster.on_serving = None
    assert rollout.abort() == "aborted"
    assert_as_before(config, before, cluster)
    with pytest.raises(InvalidRequestError, match="no rollout is in progress"):
        rollout.abort()
    with pytest.raises(InvalidRequestError, match="no interrupted or held rollout"):
        rollout.start("v2", resume=True)
    assert start_v2(rollout) == "promoted"  # and a fresh start works afterwards


def test_ctrl_c_during_a_step_rolls_back(config: Path) -> None:
    before = config.read_text()
    cluster = FakeCluster()
    rollout = make(config, cluster)

    def ctrl_c() -> None:
        if cluster.weights.get("v2") == 50:
            cluster.on_serving = None
            raise KeyboardInterrupt

    cluster.on_serving = ctrl_c
    assert start_v2(rollout) == "aborted"
    state = rollout.load_state()
    assert state and state.reason == "interrupted"
    assert_as_before(config, before, cluster)


def test_two_concurrent_starts_the_second_is_refused(config: Path) -> None:
    cluster = FakeCluster()
    first = make(config, cluster)
    second = Rollout(config, cluster, say=lambda _: None)
    inside, release = threading.Event(), threading.Event()

    def block() -> None:
        inside.set()
        release.wait(10)

    cluster.on_serving = block
    runner = threading.Thread(target=start_v2, args=(first,))
    runner.start()
    try:
        assert inside.wait(10)
        with pytest.raises(RolloutBusyError, match="another rollout command is running"):
            second.start("v3", "v1")
    finally:
        cluster.on_serving = None
        release.set()
        runner.join(10)
    assert first.load_state().status == "promoted"  # type: ignore[union-attr]


def test_abort_from_another_process_rolls_back_the_running_rollout(config: Path) -> None:
    before = config.read_text()
    cluster = FakeCluster()
    driver = make(config, cluster)
    operator = Rollout(config, cluster, say=lambda _: None, sleep=lambda _: time.sleep(0.01))
    at_step, go = threading.Event(), threading.Event()
    results: dict[str, str] = {}

    def pause_at_first_step() -> None:
        if cluster.weights.get("v2") == 50 and not go.is_set():
            at_step.set()
            go.wait(10)

    cluster.on_serving = pause_at_first_step
    runner = threading.Thread(target=lambda: results.update(driver=start_v2(driver)))
    aborter = threading.Thread(target=lambda: results.update(operator=operator.abort(wait_s=30)))
    runner.start()
    try:
        assert at_step.wait(10)
        aborter.start()  # the driver holds the lock, so abort asks it and waits for the outcome
        for _ in range(500):
            if operator.abort_path.exists():
                break
            time.sleep(0.01)
        assert operator.abort_path.exists()
    finally:
        go.set()
        runner.join(10)
        if aborter.is_alive() or aborter.ident:
            aborter.join(10)
    assert results == {"driver": "aborted", "operator": "aborted"}
    assert_as_before(config, before, cluster)
    assert not driver.abort_path.exists()


def test_status_reports_file_and_cluster_and_whether_they_agree(config: Path) -> None:
    cluster = FakeCluster()
    rollout = make(config, cluster)
    status = rollout.status()
    assert status["agree"] and status["file"]["weights"] == {"v1": 100.0} and status["rollout"] is None
    cluster.apps["v9"] = {"status": "DEPLOYING"}
    assert not rollout.status()["agree"]


FOREIGN_STATES = {
    "not JSON": b"{\"new\": \"v2\", ",
    "not UTF-8": b"\xff\xfe{}",
    "a JSON list": b"[1, 2]",
    "unknown fields": b'{"new": "v2", "stable": "v1", "before": "", "colour": "red"}',
    "missing before": b'{"new": "v2", "stable": "v1"}',
    "wrong types": b'{"new": "v2", "stable": "v1", "before": "", "step": "two"}',
    "unknown status": b'{"new": "v2", "stable": "v1", "before": "", "status": "exploded"}',
}


@pytest.mark.parametrize("kind", FOREIGN_STATES)
def test_a_corrupt_or_foreign_state_file_is_one_clear_error_from_every_command(
        config: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    from scripts import rollout as cli

    before = config.read_text()
    cluster = FakeCluster()
    rollout = make(config, cluster)
    rollout.state_path.write_bytes(FOREIGN_STATES[kind])
    applied = len(cluster.applied)
    for command in (lambda: rollout.start("v2", "v1"), rollout.abort, rollout.status,
                    lambda: rollout.start("v2", resume=True)):
        with pytest.raises(InvalidRequestError, match="is not a rollout state file this tool wrote") as refused:
            command()
        assert str(rollout.state_path) in str(refused.value) and "\n" not in str(refused.value)
    assert config.read_text() == before and rollout.state_path.read_bytes() == FOREIGN_STATES[kind]
    assert len(cluster.applied) == applied
    key_file = config.parent / "api_key"
    create_key_file(key_file)
    for argv in (["status"], ["abort"], ["start", "v2", "--from", "v1"]):
        assert cli.main(["--config", str(config), "--api-key-file", str(key_file), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "is not a rollout state file" in err, err
