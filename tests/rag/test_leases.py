"""Reader leases on index versions and pruning of the versions nobody reads."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from rag.errors import InvalidRequestError
from rag.index import Chunk, publish_index
from rag.kb_versions import list_versions
from rag.leases import (
    READERS_DIR,
    LeaseKeeper,
    check_reader_id,
    prune_versions,
    remove_leases,
    versions_in_use,
    write_lease,
)

NOW = 1_000_000.0
TTL = 30.0


def _publish(root: Path, kb: str, times: int = 1, model: str = "m") -> None:
    rng = np.random.default_rng(len(list_versions(root, kb)))
    for _ in range(times):
        vectors = rng.normal(size=(3, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        chunks = [Chunk(f"text {i}", f"s{i}.md") for i in range(3)]
        publish_index(root, kb, chunks, vectors, embedding_model=model, fingerprint="x")


def _lease_files(root: Path, kb: str) -> list[str]:
    folder = root / kb / READERS_DIR
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_write_lease_writes_one_file_per_kb(tmp_path: Path) -> None:
    _publish(tmp_path, "a")
    _publish(tmp_path, "b")
    write_lease(tmp_path, "r1", {"a": 1, "b": 1}, now=NOW)
    assert json.loads((tmp_path / "a" / READERS_DIR / "r1.json").read_text()) == {"version": 1, "time": NOW}
    assert _lease_files(tmp_path, "b") == ["r1.json"]  # no temporary file left behind


def test_write_lease_drops_kbs_no_longer_used(tmp_path: Path) -> None:
    write_lease(tmp_path, "r1", {"a": 1, "b": 2}, now=NOW)
    write_lease(tmp_path, "r2", {"a": 1}, now=NOW)
    write_lease(tmp_path, "r1", {"b": 3}, now=NOW)
    assert _lease_files(tmp_path, "a") == ["r2.json"]
    assert versions_in_use(tmp_path, "b", TTL, now=NOW) == {3}


def test_remove_leases_removes_only_that_reader(tmp_path: Path) -> None:
    write_lease(tmp_path, "r1", {"a": 1, "b": 2}, now=NOW)
    write_lease(tmp_path, "r2", {"a": 2}, now=NOW)
    remove_leases(tmp_path, "r1")
    assert _lease_files(tmp_path, "a") == ["r2.json"]
    assert _lease_files(tmp_path, "b") == []
    remove_leases(tmp_path, "r1")  # idempotent


def test_only_fresh_leases_count(tmp_path: Path) -> None:
    write_lease(tmp_path, "old", {"a": 1}, now=NOW - TTL - 1)
    write_lease(tmp_path, "new", {"a": 2}, now=NOW - TTL + 1)
    assert versions_in_use(tmp_path, "a", TTL, now=NOW) == {2}
    assert versions_in_use(tmp_path, "a", TTL, now=NOW - 5) == {1, 2}
    assert versions_in_use(tmp_path, "nobody", TTL, now=NOW) == set()


def test_unreadable_lease_protects_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_lease(tmp_path, "r1", {"a": 1}, now=NOW)
    (tmp_path / "a" / READERS_DIR / "junk.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="rag.leases"):
        assert versions_in_use(tmp_path, "a", TTL, now=NOW) == {1}
    assert "junk.json" in caplog.text


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "..", "a b", "x" * 129, "é", None, 5])
def test_bad_reader_ids_are_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="reader id"):
        check_reader_id(bad)
    with pytest.raises(InvalidRequestError):
        write_lease(tmp_path, bad, {"a": 1})  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("good", ["r1", "replica_ab-12.x", "a" * 128, "-x"])
def test_good_reader_ids(good: str) -> None:
    assert check_reader_id(good) == good


def test_prune_keeps_newest_and_leased_versions(tmp_path: Path) -> None:
    _publish(tmp_path, "kb", times=6)
    write_lease(tmp_path, "reads-2", {"kb": 2}, now=NOW - 1)
    write_lease(tmp_path, "stale-3", {"kb": 3}, now=NOW - TTL)
    assert prune_versions(tmp_path, "kb", keep=2, ttl_s=TTL, now=NOW) == [1, 3, 4]
    assert list_versions(tmp_path, "kb") == [2, 5, 6]
    assert sorted(p.name for p in (tmp_path / "kb").iterdir() if p.name.startswith("v")) == ["v2", "v5", "v6"]
    assert _lease_files(tmp_path, "kb") == ["reads-2.json"]  # the stale lease went with its version


def test_prune_keeps_what_a_deployed_config_names_and_the_newest_per_model_in_use_whatever_the_leases(
        tmp_path: Path) -> None:
    _publish(tmp_path, "kb", times=2, model="old-model")  # 1, 2
    _publish(tmp_path, "kb", times=4)  # 3..6 with "m"
    # No lease at all: a version pinned in serve_config.yaml (3), and the newest index of a model a
    # deployed version still uses (2, "old-model") stay; the newest two (5, 6) stay as ever.
    assert prune_versions(tmp_path, "kb", keep=2, ttl_s=TTL, now=NOW, protected={3},
                          newest_for_models={"old-model", "m"}) == [1, 4]
    assert list_versions(tmp_path, "kb") == [2, 3, 5, 6]


def test_prune_never_deletes_the_newest(tmp_path: Path) -> None:
    _publish(tmp_path, "kb", times=2)
    with pytest.raises(InvalidRequestError, match="keep"):
        prune_versions(tmp_path, "kb", keep=0, ttl_s=TTL)
    assert prune_versions(tmp_path, "kb", keep=1, ttl_s=TTL) == [1]
    assert prune_versions(tmp_path, "kb", keep=1, ttl_s=TTL) == []
    assert list_versions(tmp_path, "kb") == [2]


def test_prune_leaves_staging_and_unpublished_dirs_alone(tmp_path: Path) -> None:
    _publish(tmp_path, "kb", times=2)
    staging = tmp_path / "kb" / ".staging-abc"
    staging.mkdir()
    unpublished = tmp_path / "kb" / "v9"  # a publish that has not written its manifest yet
    unpublished.mkdir()
    assert prune_versions(tmp_path, "kb", keep=1, ttl_s=TTL) == [1]
    assert staging.is_dir() and unpublished.is_dir()


def test_prune_removes_old_temporary_lease_files(tmp_path: Path) -> None:
    _publish(tmp_path, "kb")
    folder = tmp_path / "kb" / READERS_DIR
    folder.mkdir()
    old, new = folder / ".r1.json.dead.tmp", folder / ".r2.json.live.tmp"
    old.write_text("{}")
    new.write_text("{}")
    os.utime(old, (NOW - TTL - 1, NOW - TTL - 1))
    os.utime(new, (NOW, NOW))
    prune_versions(tmp_path, "kb", keep=1, ttl_s=TTL, now=NOW)
    assert _lease_files(tmp_path, "kb") == [new.name]


def test_prune_of_an_unknown_kb_is_a_no_op(tmp_path: Path) -> None:
    assert prune_versions(tmp_path, "nothing", keep=1, ttl_s=TTL) == []


def test_keeper_throttles_heartbeats_but_writes_changes_at_once(tmp_path: Path) -> None:
    clock = [0.0]
    keeper = LeaseKeeper(tmp_path, "r1", ttl_s=30, clock=lambda: clock[0])
    keeper.renew({"a": 1})
    lease = tmp_path / "a" / READERS_DIR / "r1.json"
    first = json.loads(lease.read_text())["time"]
    clock[0] = 9.0
    lease.unlink()
    keeper.renew({"a": 1})
    assert not lease.exists()  # within ttl/3 of the last write, unchanged: skipped
    keeper.renew({"a": 2})
    assert json.loads(lease.read_text())["version"] == 2
    lease.unlink()
    clock[0] = 19.5
    keeper.renew({"a": 2})
    assert json.loads(lease.read_text())["time"] >= first
    keeper.close()
    assert not lease.exists()
    keeper.renew({"a": 2})
    assert not lease.exists()  # closed: a late heartbeat does not bring the lease back


def test_keeper_survives_an_unwritable_root(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "not-a-directory"  # fails for root too, unlike a chmod
    root.write_text("")
    keeper = LeaseKeeper(root, "r1", ttl_s=30)
    with caplog.at_level(logging.WARNING, logger="rag.leases"):
        keeper.renew({"a": 1})
        keeper.renew({"a": 2})
        keeper.close()
    assert caplog.text.count("cannot write the leases") == 1
