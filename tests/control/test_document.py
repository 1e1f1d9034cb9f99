"""The Serve config document: round trips that keep comments, version edits, atomic saves."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.document import ServeDocument, write_atomically
from rag.config import ConfigError
from rag.errors import InvalidRequestError, KnowledgeBaseNotFoundError

REPO = Path(__file__).resolve().parents[2]


def test_round_trip_keeps_the_file_byte_for_byte() -> None:
    for name in ("serve_config.yaml", "serve_config.gpu.yaml"):
        text = (REPO / name).read_text(encoding="utf-8")
        assert ServeDocument.load(REPO / name).dump() == text


def test_add_version_clones_stable_with_overrides_and_keeps_comments(tmp_path: Path) -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    doc.add_version("v2", "v1", {"version": "v2", "retrieval.knowledge_bases": {"samples": 2},
                                 "generation.max_new_tokens": 128})
    doc.set_weights({"v1": 90, "v2": 10})
    doc.check()
    doc.save(tmp_path / "c.yaml")
    again = ServeDocument.load(tmp_path / "c.yaml")
    v2 = again.plain()["applications"][-1]
    assert v2["name"] == "v2" and v2["route_prefix"] is None
    assert v2["args"]["retrieval"]["knowledge_bases"] == {"samples": 2}
    assert v2["args"]["generation"]["max_new_tokens"] == 128
    assert again.weights == {"v1": 90.0, "v2": 10.0}
    assert "# The one place where versions" in (tmp_path / "c.yaml").read_text()
    # the stable version is untouched
    assert again.plain()["applications"][1]["args"]["generation"]["max_new_tokens"] == 256


def _published(kb_root: Path, name: str, *versions: int) -> Path:
    for v in versions:
        (kb_root / name / f"v{v}").mkdir(parents=True)
        (kb_root / name / f"v{v}" / "manifest.json").write_text("{}")
    return kb_root


def test_pin_latest_fixes_a_new_version_to_the_index_published_now(tmp_path: Path) -> None:
    kb_root = _published(tmp_path, "samples", 1, 2)
    doc = ServeDocument.load(REPO / "serve_config.yaml").variant(kb_root=kb_root)
    doc.add_version("v2", "v1", {"version": "v2", "retrieval.knowledge_bases": {"samples": "latest", "faq": 1}})
    assert doc.pin_latest("v2") == {"samples": 2}
    assert doc.plain()["applications"][-1]["args"]["retrieval"]["knowledge_bases"] == {"samples": 2, "faq": 1}
    assert doc.pin_latest("v2") == {}  # pinned already: nothing to do
    v1 = doc.plain()["applications"][1]["args"]["retrieval"]
    assert v1["knowledge_bases"] == {"samples": "latest"}  # v1 untouched
    doc.check()


def test_pin_latest_without_an_index_says_what_to_do(tmp_path: Path) -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    doc.add_version("v2", "v1", {"version": "v2", "retrieval.kb_root": str(tmp_path),
                                 "retrieval.knowledge_bases": {"samples": "latest"}})
    with pytest.raises(KnowledgeBaseNotFoundError, match="ingest it first"):
        doc.pin_latest("v2")


def test_remove_version_drops_its_app_and_weight() -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    doc.add_version("v2", "v1", {"version": "v2"})
    doc.set_weights({"v1": 0, "v2": 100})
    doc.remove_version("v1")
    assert list(doc.versions) == ["v2"] and doc.weights == {"v2": 100.0}
    doc.check()


def test_check_refuses_traffic_to_a_missing_version() -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    doc.set_weights({"v1": 50, "v9": 50})
    with pytest.raises(ConfigError, match="v9"):
        doc.check()


def test_adding_an_existing_version_or_missing_stable_is_refused() -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    with pytest.raises(InvalidRequestError, match="already"):
        doc.add_version("v1", "v1", {})
    doc.set_weights({"v1": 0})
    with pytest.raises(InvalidRequestError, match="no stable version"):
        doc.stable_version(excluding="v2")


def test_rollout_settings_live_in_the_gateway_args() -> None:
    cfg = ServeDocument.load(REPO / "serve_config.yaml").gateway.rollout
    assert cfg.steps[-1] == 100 and cfg.interval_s > 0


def test_variant_changes_port_kb_root_and_deployments_and_keeps_comments(tmp_path: Path) -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml").variant(
        http_port=8123, kb_root=tmp_path, pipeline_args={"generation": {"max_new_tokens": 7}},
        traffic={"draining": True}, deployment_options={"Generator": {"num_replicas": 2}})
    plain = doc.plain()
    v1 = next(a for a in plain["applications"] if a["name"] == "v1")
    assert plain["http_options"]["port"] == 8123
    assert v1["args"]["retrieval"]["kb_root"] == str(tmp_path)
    assert v1["args"]["generation"]["max_new_tokens"] == 7 and v1["args"]["generation"]["backend"] == "extractive"
    generator = next(d for d in v1["deployments"] if d["name"] == "Generator")
    assert generator["num_replicas"] == 2 and "autoscaling_config" not in generator  # fixed replaces autoscaled
    doc.check()
    back = doc.variant(deployment_options={"Generator": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 2}}})
    generator = next(d for d in back.plain()["applications"][1]["deployments"] if d["name"] == "Generator")
    assert "num_replicas" not in generator and generator["autoscaling_config"]["min_replicas"] == 0
    back.check()
    assert doc.weights == {"v1": 100.0}
    assert "# The one place where versions" in doc.dump()
    assert ServeDocument.load(REPO / "serve_config.yaml").plain()["http_options"]["port"] == 8000  # a copy


def test_a_crash_mid_write_leaves_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "serve_config.yaml"
    path.write_text("old: 1\n")

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("control.document.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, "new: 2\n" * 1000)
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["serve_config.yaml"]  # no temporary file left behind
    monkeypatch.undo()
    write_atomically(path, "new: 2\n")
    assert path.read_text() == "new: 2\n"
