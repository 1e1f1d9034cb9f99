"""The gateway's security settings in the Serve config: keys by file, no open gateway beyond loopback,
bounded queues everywhere."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from control.document import load_serve_config
from control.serve_config import GATEWAY_BUILDER, check_serve_config, is_app
from rag.config import ConfigError, GatewayConfig, LimitsConfig
from rag.constants import PROJECT_ROOT

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["serve_config.yaml", "serve_config.gpu.yaml"]


def _gateway_args(config: dict) -> dict:
    return next(a for a in config["applications"] if is_app(a, GATEWAY_BUILDER))["args"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_use_a_key_file_and_bounded_queues(name: str) -> None:
    config = load_serve_config(REPO / name)
    check_serve_config(config)
    gateway = GatewayConfig.model_validate(_gateway_args(config))
    assert not gateway.allow_unauthenticated and gateway.api_key_path == PROJECT_ROOT / "var" / "api_key"
    for app in config["applications"]:
        for deployment in app["deployments"]:
            assert deployment.get("max_queued_requests", -1) > 0, (app["name"], deployment["name"])
    gateway_deployment = next(d for a in config["applications"] for d in a["deployments"] if d["name"] == "Gateway")
    assert gateway_deployment["backpressure_config"]["retry_after_s"] >= 1


@pytest.mark.parametrize(("host", "refused"), [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                               (None, False), ("0.0.0.0", True), ("10.1.2.3", True)])
def test_unauthenticated_gateway_only_on_loopback(host: str | None, refused: bool) -> None:
    config = copy.deepcopy(load_serve_config(REPO / "serve_config.yaml"))
    config["http_options"] = {"port": 8000, **({"host": host} if host else {})}
    _gateway_args(config)["allow_unauthenticated"] = True
    if refused:
        with pytest.raises(ConfigError, match=r"allow_unauthenticated.*not loopback"):
            check_serve_config(config)
    else:
        check_serve_config(config)
    _gateway_args(config)["allow_unauthenticated"] = False
    check_serve_config(config)


def test_limits_may_be_lowered_not_raised_past_the_schema() -> None:
    assert LimitsConfig(max_messages=8).max_messages == 8
    with pytest.raises(ValueError, match="max_messages"):
        LimitsConfig(max_messages=65)
    assert LimitsConfig(max_body_bytes=8 * 1024 * 1024).max_body_bytes == 8 * 1024 * 1024


def test_an_upload_wait_longer_than_the_gateways_drain_is_refused_naming_both() -> None:
    config = copy.deepcopy(load_serve_config(REPO / "serve_config.yaml"))
    _gateway_args(config)["knowledge_base"]["wait_s"] = 300
    with pytest.raises(ConfigError) as refused:
        check_serve_config(config)
    message = str(refused.value)
    assert "Gateway.graceful_shutdown_timeout_s (150)" in message and "KnowledgeBases" in message
    assert "knowledge_base.wait_s (300)" in message
