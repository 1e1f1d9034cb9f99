"""The Serve config file as a document: the one place `serve_config.yaml` is read for editing and written.

ruamel.yaml's round trip keeps the operator's comments and layout through every edit the tools make,
and every save is atomic (a temporary file renamed over the old one), so a crash mid-write leaves the
previous file whole.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from control.serve_config import GATEWAY_BUILDER, GATEWAY_DEPLOYMENT, PIPELINE_BUILDER, check_serve_config, is_app
from rag.config import ConfigError, GatewayConfig, PipelineConfig, validate
from rag.constants import resolve_path
from rag.errors import InvalidRequestError
from rag.kb_store import is_temporary
from rag.kb_versions import list_knowledge_bases, resolve_version


def _represent_null(representer: Any, _: None) -> Any:
    # Serve needs `route_prefix: null` written out: an omitted or empty value means "/".
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def round_trip_yaml() -> YAML:
    """The one YAML set-up for documents the tools edit: comments, quotes and layout kept."""
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
        return cls(round_trip_yaml().load(Path(path).read_text(encoding="utf-8")))

    @classmethod
    def from_text(cls, text: str) -> ServeDocument:
        return cls(round_trip_yaml().load(text))

    def dump(self) -> str:
        out = io.StringIO()
        round_trip_yaml().dump(self.data, out)
        return out.getvalue()

    def save(self, path: str | Path) -> None:
        write_atomically(path, self.dump())

    def copy(self) -> ServeDocument:
        return ServeDocument(copy.deepcopy(self.data))

    def variant(self, *, http_port: int | None = None, kb_root: str | Path | None = None,
                pipeline_args: dict[str, Any] | None = None, traffic: dict[str, Any] | None = None,
                deployment_options: dict[str, dict[str, Any]] | None = None,
                gateway_args: dict[str, Any] | None = None) -> ServeDocument:
        """A copy with another HTTP port, KB root, pipeline settings (merged per section), gateway args
        or traffic settings, or per-deployment options (`{"Generator": {"ray_actor_options": ...}}`; a
        `num_replicas` there fixes the count, dropping the deployment's autoscaling; an `autoscaling_config`
        drops a fixed count)."""
        doc = self.copy()
        if http_port is not None:
            doc.data.setdefault("http_options", {})["port"] = http_port
        for app in doc.data["applications"]:
            if is_app(app, PIPELINE_BUILDER):
                _patch_pipeline(app.setdefault("args", {}), kb_root, pipeline_args or {})
            if is_app(app, GATEWAY_BUILDER) and gateway_args:
                app["args"] = {**(app.get("args") or {}), **gateway_args}
            for deployment in app.get("deployments") or []:
                options = (deployment_options or {}).get(deployment["name"], {})
                if "num_replicas" in options:  # a fixed count replaces the autoscaling bounds, and back
                    deployment.pop("autoscaling_config", None)
                if "autoscaling_config" in options:
                    deployment.pop("num_replicas", None)
                deployment.update(options)
                if deployment["name"] == GATEWAY_DEPLOYMENT and traffic:
                    deployment["user_config"] = {**(deployment.get("user_config") or {}), **traffic}
        return doc

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
                    if deployment.get("name") == GATEWAY_DEPLOYMENT:
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

    @property
    def shadow(self) -> str | None:
        value = (self._gateway_deployment().get("user_config") or {}).get("shadow")
        return str(value) if value else None

    def set_shadow(self, version: str | None) -> None:
        """The version the gateway copies answered requests to (None: no copies)."""
        deployment = self._gateway_deployment()
        if deployment.get("user_config") is None:
            deployment["user_config"] = {}
        if version:
            deployment["user_config"]["shadow"] = version
        else:
            deployment["user_config"].pop("shadow", None)

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

        A version left on `latest` follows every new ingest live (`retrieval.refresh_interval_s`), and
        its replicas may briefly disagree on the version: pinned, a version answers from the same index
        for as long as it lives, so a rollout compares like with like. Returns the pins made."""
        args = self.versions[name].setdefault("args", {})
        config = validate(PipelineConfig, _plain(args), f"args of version {name!r}")
        pins = {kb: resolve_version(config.retrieval.kb_root_path, kb, "latest")
                for kb, version in config.retrieval.knowledge_bases.items() if version == "latest"}
        if pins:
            _set_dotted(args, "retrieval.knowledge_bases", {**config.retrieval.knowledge_bases, **pins})
        return pins

    def kb_root(self, name: str) -> Path:
        return validate(PipelineConfig, _plain(self.versions[name].get("args")),
                        f"args of version {name!r}").retrieval.kb_root_path

    def served_knowledge_bases(self, name: str) -> set[str]:
        """What version `name` answers from: its listed knowledge bases, and with `discover` every other one
        published under its kb_root now."""
        args = _plain(self.versions[name].get("args"))
        retrieval = validate(PipelineConfig, args, f"args of version {name!r}").retrieval
        # Temporary KBs (file chats) come and go within minutes: not what a rollout compares or pins.
        discovered = {kb for kb in list_knowledge_bases(retrieval.kb_root_path) if not is_temporary(kb)}
        return set(retrieval.knowledge_bases) | (discovered if retrieval.discover else set())

    def follow_latest_like(self, name: str, other: str) -> list[str]:
        """Set version `name` to follow `latest` for every knowledge base that version `other` follows
        (after a promotion: the pin that let the rollout compare like with like has done its job).
        Returns the knowledge bases changed."""
        args = self.versions[name].setdefault("args", {})
        mine = validate(PipelineConfig, _plain(args), f"args of version {name!r}").retrieval.knowledge_bases
        theirs = validate(PipelineConfig, _plain(self.versions[other].get("args")),
                          f"args of version {other!r}").retrieval.knowledge_bases
        changed = sorted(kb for kb, v in mine.items() if v != "latest" and theirs.get(kb) == "latest")
        if changed:
            _set_dotted(args, "retrieval.knowledge_bases", {**mine, **dict.fromkeys(changed, "latest")})
        return changed

    def remove_version(self, name: str) -> None:
        self.data["applications"] = [a for a in self.data["applications"] if a.get("name") != name]
        self.set_weights({v: w for v, w in self.weights.items() if v != name})


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """The Serve config at `path` (relative to the project root) as plain dicts, read as every tool
    reads it (ruamel, YAML 1.2), with its shape checked; `check_serve_config` checks the contents."""
    try:
        data = ServeDocument.load(resolve_path(path)).plain()
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("applications"), list):
        raise ConfigError(f"{path}: not a Serve config (no 'applications' list)")
    bad = [i for i, app in enumerate(data["applications"]) if not isinstance(app, dict)]
    if bad:
        raise ConfigError(f"{path}: applications {bad} are not mappings with name, import_path and args")
    return data


def write_atomically(path: str | Path, text: str) -> None:
    """Replace `path` with `text` so that a reader, or a crash, sees the old file or the new one, never half."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if target.exists():
            os.chmod(tmp, target.stat().st_mode & 0o777)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _patch_pipeline(args: Any, kb_root: str | Path | None, pipeline_args: dict[str, Any]) -> None:
    if kb_root is not None:
        if args.get("retrieval") is None:
            args["retrieval"] = {}
        args["retrieval"]["kb_root"] = str(kb_root)
    for section, values in pipeline_args.items():
        args[section] = {**(args.get(section) or {}), **values} if isinstance(values, dict) else values


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    # Round-trip scalars are subclasses that remember their quotes or anchors: hand on the base types.
    for kind in (ScalarBoolean, bool, str, int, float):
        if isinstance(node, kind):
            return bool(node) if kind is ScalarBoolean else kind(node)
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
