"""The configuration schema: defaults validate, bad values are named, the repo's Serve config parses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from control.document import load_serve_config
from control.serve_config import pipeline_configs
from rag.config import (
    ConfigError,
    EmbeddingConfig,
    GatewayConfig,
    GenerationConfig,
    PipelineConfig,
    RetrievalConfig,
    SplitterConfig,
    TrafficConfig,
    check_kb_name,
    validate,
)
from rag.constants import BUNDLED_EMBEDDING_MODEL
from rag.errors import InvalidRequestError, RagError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("schema", [PipelineConfig, EmbeddingConfig, SplitterConfig, RetrievalConfig,
                                    GenerationConfig, TrafficConfig, GatewayConfig])
def test_defaults_validate(schema: type[BaseModel]) -> None:
    assert validate(schema, {}, "test") == schema()
    assert validate(schema, None, "test") == schema()


def test_pipeline_defaults_are_the_documented_ones() -> None:
    cfg = PipelineConfig()
    assert cfg.version == "v1"
    assert cfg.embedding.model == BUNDLED_EMBEDDING_MODEL
    assert cfg.splitter.chunk_overlap < cfg.splitter.chunk_size
    assert cfg.retrieval.knowledge_bases == {"samples": "latest"}
    assert cfg.generation.backend == "extractive"
    assert TrafficConfig().weights == {"v1": 100.0}


def _error(schema: type[BaseModel], data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        validate(schema, data, "the test config")
    message = str(info.value)
    assert message.startswith("invalid the test config:"), message
    return message


def test_config_error_is_a_rag_error_and_value_error() -> None:
    assert issubclass(ConfigError, RagError)
    assert issubclass(ConfigError, ValueError)


def test_overlap_not_below_size_names_both_values() -> None:
    message = _error(PipelineConfig, {"splitter": {"chunk_size": 200, "chunk_overlap": 200}})
    assert "splitter" in message
    assert "chunk_overlap (200)" in message
    assert "chunk_size (200)" in message


def test_overlap_just_below_size_is_fine() -> None:
    assert validate(SplitterConfig, {"chunk_size": 200, "chunk_overlap": 199}, "x").chunk_overlap == 199


def test_transformers_backend_without_model() -> None:
    message = _error(PipelineConfig, {"generation": {"backend": "transformers"}})
    assert "generation" in message
    assert "generation.model is required" in message
    assert "'transformers'" in message


def test_transformers_backend_with_model_is_fine() -> None:
    cfg = validate(GenerationConfig, {"backend": "transformers", "model": "some/model"}, "x")
    assert cfg.model == "some/model"


def test_unknown_extra_key_is_named_with_its_value() -> None:
    message = _error(PipelineConfig, {"embedding": {"modle": "typo-model"}})
    assert "embedding.modle" in message
    assert "'typo-model'" in message


def test_unknown_top_level_key() -> None:
    message = _error(PipelineConfig, {"retreival": {"top_k": 3}})
    assert "retreival" in message


def test_out_of_range_value_is_named_with_its_value() -> None:
    message = _error(PipelineConfig, {"retrieval": {"top_k": 0}})
    assert "retrieval.top_k" in message
    assert "(got 0)" in message


def test_every_bad_key_is_reported() -> None:
    message = _error(PipelineConfig, {"retrieval": {"top_k": 0}, "generation": {"temperature": 9}})
    assert "retrieval.top_k" in message
    assert "generation.temperature" in message
    assert "(got 9)" in message


def test_negative_traffic_weight() -> None:
    message = _error(TrafficConfig, {"weights": {"v1": 100, "v2": -5}})
    assert "weights" in message
    assert "'v2'" in message
    assert "-5" in message


def test_all_zero_weights() -> None:
    message = _error(TrafficConfig, {"weights": {"v1": 0, "v2": 0}})
    assert "weights" in message
    assert "at least one version needs a weight > 0" in message
    assert "'v1': 0" in message


def test_bad_version_name_in_weights() -> None:
    message = _error(TrafficConfig, {"weights": {"v 1": 100}})
    assert "'v 1'" in message


def test_bad_knowledge_base_name() -> None:
    message = _error(RetrievalConfig, {"knowledge_bases": {"bad name!": "latest"}})
    assert "knowledge_bases" in message
    assert "'bad name!'" in message


BAD_KB_NAMES = ["", "../x", "..", ".", "/abs", "/etc/passwd", "a/b", "a\\b", ".staging-1", "-x", "a b",
                "x" * 64, "x\n", "x\x00", "é"]


@pytest.mark.parametrize("name", BAD_KB_NAMES)
def test_check_kb_name_refuses_anything_but_one_safe_path_component(name: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid knowledge base name"):
        check_kb_name(name)


@pytest.mark.parametrize("name", ["a", "samples", "KB_2-x", "0", "x" * 63])
def test_check_kb_name_returns_a_good_name(name: str) -> None:
    assert check_kb_name(name) == name


def test_check_kb_name_refuses_non_strings() -> None:
    with pytest.raises(InvalidRequestError, match="None"):
        check_kb_name(None)


def test_check_kb_name_quotes_a_long_name_truncated() -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_kb_name("../" + "y" * 1_000_000)
    message = str(info.value)
    assert len(message) < 300
    assert "'../yyy" in message
    assert "1000003 chars" in message


@pytest.mark.parametrize("name", ["../x", "/abs", "x" * 64])
def test_config_kb_names_use_check_kb_name(name: str) -> None:
    with pytest.raises(InvalidRequestError) as expected:
        check_kb_name(name)
    retrieval = _error(RetrievalConfig, {"knowledge_bases": {name: "latest"}})
    gateway = _error(GatewayConfig, {"default_knowledge_base": name})
    assert str(expected.value) in retrieval
    assert str(expected.value) in gateway


def test_knowledge_base_version_zero() -> None:
    message = _error(RetrievalConfig, {"knowledge_bases": {"samples": 0}})
    assert "knowledge_bases" in message
    assert "'samples'" in message
    assert "version 0" in message


def test_no_knowledge_base() -> None:
    message = _error(RetrievalConfig, {"knowledge_bases": {}})
    assert "at least one knowledge base" in message


def test_knowledge_base_pinned_versions_validate() -> None:
    cfg = validate(RetrievalConfig, {"knowledge_bases": {"a": 2, "b-2": "latest"}}, "x")
    assert cfg.knowledge_bases == {"a": 2, "b-2": "latest"}


def test_follow_settings_default_to_following_listed_latest_every_second() -> None:
    cfg = RetrievalConfig()
    assert (cfg.discover, cfg.refresh_interval_s, cfg.lease_ttl_s) == (False, 1.0, 30.0)
    assert cfg.heartbeat_interval_s == 1.0
    assert RetrievalConfig(refresh_interval_s=0).heartbeat_interval_s == 10.0  # leases live on without refreshes


def test_lease_ttl_must_outlive_three_refreshes() -> None:
    message = _error(RetrievalConfig, {"refresh_interval_s": 20, "lease_ttl_s": 59})
    assert "lease_ttl_s (59.0) must be at least 3 x refresh_interval_s (20.0)" in message
    assert RetrievalConfig(refresh_interval_s=20, lease_ttl_s=60).lease_ttl_s == 60
    assert RetrievalConfig(refresh_interval_s=0, lease_ttl_s=1).refresh_interval_s == 0


@pytest.mark.parametrize("bad", [{"refresh_interval_s": -1}, {"lease_ttl_s": 0}, {"discover": "sometimes"}])
def test_bad_follow_settings_are_named(bad: dict[str, Any]) -> None:
    assert f"retrieval.{next(iter(bad))}" in _error(PipelineConfig, {"retrieval": bad})


def test_bad_pipeline_version_name() -> None:
    message = _error(PipelineConfig, {"version": "bad version"})
    assert "version" in message
    assert "'bad version'" in message


def test_configs_are_frozen() -> None:
    cfg = PipelineConfig()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error type
        cfg.version = "v2"  # type: ignore[misc]


def test_kb_root_relative_resolves_under_project_root(tmp_path: Path) -> None:
    assert RetrievalConfig(kb_root=tmp_path).kb_root_path == tmp_path
    relative = RetrievalConfig(kb_root=Path("var/kb")).kb_root_path
    assert relative.is_absolute()
    assert relative.parts[-2:] == ("var", "kb")


def test_repo_serve_config_deploys_v1_with_expected_settings() -> None:
    data = load_serve_config(REPO_ROOT / "serve_config.yaml")
    versions = pipeline_configs(data)
    assert list(versions) == ["v1"]
    v1 = versions["v1"]
    assert v1.version == "v1"
    assert v1.embedding.model == BUNDLED_EMBEDDING_MODEL
    assert v1.embedding.max_batch_size == 32
    assert (v1.splitter.chunk_size, v1.splitter.chunk_overlap) == (750, 150)
    assert v1.retrieval.kb_root == Path("var/kb")
    assert v1.retrieval.knowledge_bases == {"samples": "latest"} and v1.retrieval.discover
    assert v1.retrieval.mode == "auto" and v1.embedding.languages == ["en"]
    assert v1.retrieval.top_k == 3
    assert v1.retrieval.score_threshold == pytest.approx(0.2)
    assert v1.generation.backend == "extractive"
    assert v1.generation.max_new_tokens == 256
    assert v1.generation.max_stream_seconds == pytest.approx(60)


def test_repo_serve_config_gateway_and_traffic_validate() -> None:
    data = load_serve_config("serve_config.yaml")  # relative: resolved against the project root
    gateway = next(app for app in data["applications"] if app["name"] == "gateway")
    assert validate(GatewayConfig, gateway["args"], "gateway args").default_knowledge_base == "samples"
    traffic = validate(TrafficConfig, gateway["deployments"][0]["user_config"], "user_config")
    assert set(traffic.weights) <= set(pipeline_configs(data))


@pytest.mark.parametrize("text", ["foo: 1\n", "- a\n- b\n", "", "just a string\n"])
def test_file_that_is_not_a_serve_config(tmp_path: Path, text: str) -> None:
    path = tmp_path / "not_serve.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="not a Serve config"):
        load_serve_config(path)


def test_invalid_pipeline_args_name_the_application(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        "applications:\n"
        "  - name: v9\n"
        "    import_path: deployments.app:build_pipeline_app\n"
        "    args: {version: v9, splitter: {chunk_size: 100, chunk_overlap: 300}}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        pipeline_configs(load_serve_config(path))
    assert "'v9'" in str(info.value)
    assert "chunk_overlap (300)" in str(info.value)


def test_only_pipeline_applications_are_pipeline_configs(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        "applications:\n"
        "  - name: gateway\n"
        "    import_path: deployments.app:build_gateway_app\n"
        "    args: {default_knowledge_base: samples}\n"
        "  - name: v2\n"
        "    import_path: deployments.app:build_pipeline_app\n"
        "    args: {version: v2, retrieval: {top_k: 5}}\n", encoding="utf-8")
    versions = pipeline_configs(load_serve_config(path))
    assert list(versions) == ["v2"]
    assert versions["v2"].retrieval.top_k == 5


def test_a_rollout_that_would_judge_on_no_canary_request_is_refused() -> None:
    from pydantic import ValidationError

    from rag.config import RolloutConfig

    with pytest.raises(ValidationError, match="min_requests"):
        RolloutConfig(min_requests=0)
    assert RolloutConfig(min_requests=1).min_requests == 1
