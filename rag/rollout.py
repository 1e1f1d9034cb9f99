"""The pure half of a rollout: editing the Serve config document and judging each traffic step.

The document is edited with ruamel.yaml's round trip, so the operator's comments and layout in
`serve_config.yaml` survive every step the tool writes.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML

from rag.config import (
    GATEWAY_BUILDER,
    PIPELINE_BUILDER,
    GatewayConfig,
    PipelineConfig,
    RolloutConfig,
    check_serve_config,
    is_app,
    validate,
)
from rag.errors import InvalidRequestError
from rag.index import resolve_version
from rag.stats import ttft_key


def _represent_null(representer: Any, _: None) -> Any:
    # Serve needs `route_prefix: null` written out: an omitted or empty value means "/".
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def _yaml() -> YAML:
    yaml = YAML()
    yaml.representer.add_representer(type(None), _represent_null)
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


class ServeDocument:
    """A Serve config file as a document: versions, gateway weights, add / remove a version."""

    def __init__(self, data: Any) -> None:
        self.data = data

    @classmethod
    def load(cls, path: str | Path) -> ServeDocument:
        return cls(_yaml().load(Path(path).read_text(encoding="utf-8")))

    def dump(self) -> str:
        out = io.StringIO()
        _yaml().dump(self.data, out)
        return out.getvalue()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dump(), encoding="utf-8")

    def plain(self) -> dict[str, Any]:
        """The document as plain dicts and lists (what the Serve REST API and the checks take)."""
        return _plain(self.data)

    def check(self) -> None:
        check_serve_config(self.plain())

    @property
    def versions(self) -> dict[str, Any]:
        return {app["name"]: app for app in self.data["applications"] if is_app(app, PIPELINE_BUILDER)}

    def _gateway_deployment(self) -> Any:
        for app in self.data["applications"]:
            if is_app(app, GATEWAY_BUILDER):
                for deployment in app.get("deployments") or []:
                    if deployment.get("name") == "Gateway":
                        return deployment
        raise InvalidRequestError("the config has no gateway application with a Gateway deployment")

    @property
    def gateway(self) -> GatewayConfig:
        app = next(a for a in self.data["applications"] if is_app(a, GATEWAY_BUILDER))
        return validate(GatewayConfig, _plain(app.get("args")), "gateway application args")

    @property
    def weights(self) -> dict[str, float]:
        user_config = self._gateway_deployment().get("user_config") or {}
        return {k: float(v) for k, v in (user_config.get("weights") or {}).items()}

    def set_weights(self, weights: dict[str, float]) -> None:
        deployment = self._gateway_deployment()
        if deployment.get("user_config") is None:
            deployment["user_config"] = {}
        deployment["user_config"]["weights"] = {k: _number(v) for k, v in weights.items()}

    def stable_version(self, excluding: str) -> str:
        candidates = {v: w for v, w in self.weights.items() if v != excluding and w > 0 and v in self.versions}
        if not candidates:
            raise InvalidRequestError(f"no stable version with traffic besides {excluding!r} in {self.weights}")
        return max(candidates, key=lambda v: candidates[v])

    def add_version(self, name: str, copy_of: str, overrides: dict[str, Any]) -> None:
        """A new pipeline application `name` cloned from `copy_of`, with `overrides` (dotted arg keys)."""
        if name in self.versions:
            raise InvalidRequestError(f"version {name!r} is already in the config")
        app = copy.deepcopy(self.versions[copy_of])
        app["name"] = name
        app["args"]["version"] = name
        for dotted, value in overrides.items():
            _set_dotted(app["args"], dotted, value)
        self.data["applications"].append(app)

    def pin_latest(self, name: str) -> dict[str, int]:
        """Replace `latest` among version `name`'s knowledge bases with the index version published now.

        `latest` is resolved each time a replica starts, so a version left on it would switch index
        the next time a replica restarts after an ingest: pinned, a version answers from the same
        index for as long as it lives. Returns the pins made."""
        args = self.versions[name].setdefault("args", {})
        config = validate(PipelineConfig, _plain(args), f"args of version {name!r}")
        pins = {kb: resolve_version(config.retrieval.kb_root_path, kb, "latest")
                for kb, version in config.retrieval.knowledge_bases.items() if version == "latest"}
        if pins:
            _set_dotted(args, "retrieval.knowledge_bases", {**config.retrieval.knowledge_bases, **pins})
        return pins

    def remove_version(self, name: str) -> None:
        self.data["applications"] = [a for a in self.data["applications"] if a.get("name") != name]
        self.set_weights({v: w for v, w in self.weights.items() if v != name})


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _set_dotted(target: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        if target.get(key) is None:
            target[key] = {}
        target = target[key]
    target[last] = value


@dataclass(frozen=True)
class Verdict:
    action: Literal["continue", "rollback", "wait"]
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


def judge(canary: dict[str, Any], stable: dict[str, Any] | None, cfg: RolloutConfig) -> Verdict:
    """Compare the canary with the stable version over one observation window."""
    numbers = {"canary": canary, "stable": stable}
    if canary.get("requests", 0) < cfg.min_requests:
        return Verdict("wait", f"only {canary.get('requests', 0)} canary requests, need {cfg.min_requests}", numbers)
    baseline = stable["error_rate"] if stable and stable.get("requests") else 0.0
    increase = canary["error_rate"] - baseline
    if increase > cfg.max_error_rate_increase:
        return Verdict("rollback", f"canary error rate {canary['error_rate']:.3f} is {increase:.3f} above stable "
                                   f"{baseline:.3f} (limit {cfg.max_error_rate_increase})", numbers)
    q = tail_quantile(min(canary.get("ttft_samples", 0), (stable or {}).get("ttft_samples", 0)))
    name = f"p{round(q * 100)}"
    c_tail, s_tail = canary.get(ttft_key(q)), (stable or {}).get(ttft_key(q))
    if c_tail is not None and s_tail and c_tail - s_tail > cfg.ttft_slack_s and c_tail > s_tail * cfg.max_ttft_ratio:
        return Verdict("rollback", f"canary {name} time to first token {c_tail:.3f}s is over {cfg.max_ttft_ratio}x "
                                   f"stable {s_tail:.3f}s", numbers)
    return Verdict("continue", f"canary error rate {canary['error_rate']:.3f} (stable {baseline:.3f}), {name} TTFT "
                               f"{_seconds(c_tail)} (stable {_seconds(s_tail)})", numbers)


def tail_quantile(samples: int) -> float:
    """The highest of p99, p90, p50 that `samples` observations estimate: p99 of 10 requests would be
    their maximum, so one slow request would decide the rollout."""
    if samples >= 100:
        return 0.99
    return 0.9 if samples >= 10 else 0.5


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}s"
