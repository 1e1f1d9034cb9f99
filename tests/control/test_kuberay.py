"""The KubeRay RayService manifest: valid against the RayService CRD, in step with serve_config.yaml, and
with the probes, grace periods and secrets the README promises. No Kubernetes needed."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from scripts import kuberay_manifest

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "control" / "kuberay" / "rayservice.yaml"
VENDORED_CRD = REPO / "control" / "kuberay" / "crd" / "ray.io_rayservices.yaml"
SHARED_CRD = REPO / ".." / "shared" / "kuberay" / "ray.io_rayservices.yaml"
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as `kubectl apply` (strict field validation) refuses
    them; a plain openAPIV3Schema would let a misspelt key through."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


@functools.cache
def rayservice_schema(crd_path: Path) -> dict[str, Any]:
    """The openAPIV3Schema of the CRD's stored version (the served one if none is marked stored)."""
    crd = yaml.load(crd_path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    versions = sorted(crd["spec"]["versions"], key=lambda v: (not v.get("storage"), not v.get("served")))
    return strict(versions[0]["schema"]["openAPIV3Schema"])


def schema_errors(manifest: dict[str, Any], crd_path: Path = VENDORED_CRD) -> list[str]:
    validator = jsonschema.Draft202012Validator(rayservice_schema(crd_path))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def serve_config(manifest: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def pod_specs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def worker_containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    groups = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


@pytest.mark.parametrize("crd_path", [VENDORED_CRD, SHARED_CRD], ids=["vendored", "shared"])
def test_manifest_matches_the_rayservice_crd(manifest: dict[str, Any], crd_path: Path) -> None:
    if not crd_path.exists():
        pytest.skip(f"no {crd_path}")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert schema_errors(manifest, crd_path) == []


def test_vendored_crd_is_the_shared_one() -> None:
    if not SHARED_CRD.exists():
        pytest.skip(f"no {SHARED_CRD}")
    assert VENDORED_CRD.read_bytes() == SHARED_CRD.read_bytes()


@pytest.mark.parametrize(("path", "value"), [
    ("spec/rayClusterConfig/authOptions/mode", "tokens"),                          # not in the enum
    ("spec/rayClusterConfig/workerGroupSpecs/0/rayStartParams/num-cpus", 2),       # must be a string
    ("spec/rayClusterConfig/headGroupSpec/template/spec/terminationGracePeriodSecond", 180),  # misspelt
    ("spec/rayClusterConfig/workerGroupSpecs/0/replicas", "two"),                  # not an integer
    ("spec/serveConfigV2", {"applications": []}),                                  # must be a string
], ids=["enum", "map-value-type", "unknown-field", "integer", "string"])
def test_a_broken_manifest_fails_the_schema(manifest: dict[str, Any], path: str, value: Any) -> None:
    broken = copy.deepcopy(manifest)
    *parents, last = path.split("/")
    node: Any = broken
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    errors = schema_errors(broken)
    assert errors and any(last in error for error in errors), errors


def test_serve_config_v2_is_generated_from_serve_config() -> None:
    manifest_text = MANIFEST.read_text(encoding="utf-8")
    generated = kuberay_manifest.serve_config_v2((REPO / "serve_config.yaml").read_text(encoding="utf-8"))
    assert yaml.safe_load(manifest_text)["spec"]["serveConfigV2"] == generated
    assert kuberay_manifest.main(["--check"]) == 0, "run `python -m scripts.kuberay_manifest`"


def test_check_fails_on_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    changed = (REPO / "serve_config.yaml").read_text(encoding="utf-8").replace("weights: {v1: 100}",
                                                                               "weights: {v1: 90, v2: 10}")
    (tmp_path / "serve_config.yaml").write_text(changed, encoding="utf-8")
    monkeypatch.setattr(kuberay_manifest, "SERVE_CONFIG", tmp_path / "serve_config.yaml")
    assert kuberay_manifest.main(["--check"]) == 1


def test_kubernetes_substitutions(manifest: dict[str, Any], serve_config: dict[str, Any]) -> None:
    local = yaml.safe_load((REPO / "serve_config.yaml").read_text(encoding="utf-8"))
    assert [a["name"] for a in serve_config["applications"]] == [a["name"] for a in local["applications"]]
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    pipelines = [a for a in serve_config["applications"] if a["import_path"].endswith(":build_pipeline_app")]
    assert pipelines and all(a["args"]["retrieval"]["kb_root"] == "/kb" for a in pipelines)
    for container in worker_containers(manifest):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/kb") == "kb"
    gateway = next(a for a in serve_config["applications"] if a["import_path"].endswith(":build_gateway_app"))
    key_dir, key_name = gateway["args"]["api_key_file"].rsplit("/", 1)
    for spec in pod_specs(manifest)[1:]:
        volumes = {v["name"]: v for v in spec["volumes"]}
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == key_dir)
        assert mount.get("readOnly") is True
        assert "secretName" in volumes[mount["name"]]["secret"], f"{key_name} must come from a Secret"


def test_probes_hit_ready_and_health_on_the_gateway_port(manifest: dict[str, Any],
                                                          serve_config: dict[str, Any]) -> None:
    port = serve_config["http_options"]["port"]
    containers = worker_containers(manifest)
    assert containers
    for container in containers:
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port}
        assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": port}
        assert {"containerPort": port, "name": "serve"} in container["ports"]


def test_grace_period_outlasts_every_drain(manifest: dict[str, Any], serve_config: dict[str, Any]) -> None:
    deployments = [d for app in serve_config["applications"] for d in app.get("deployments") or []]
    longest_drain = max(d["graceful_shutdown_timeout_s"] for d in deployments)
    longest_stream = max(a["args"].get("generation", {}).get("max_stream_seconds", 0)
                         for a in serve_config["applications"])
    assert longest_stream > 0
    for spec in pod_specs(manifest):
        assert spec["terminationGracePeriodSeconds"] > max(longest_drain, longest_stream)
        assert spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert manifest["spec"]["rayClusterDeletionDelaySeconds"] > longest_drain


def test_no_secret_in_clear(manifest: dict[str, Any], serve_config: dict[str, Any]) -> None:
    auth = manifest["spec"]["rayClusterConfig"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    for spec in pod_specs(manifest):
        for container in spec["containers"]:
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env, f"{env['name']} is written in clear"
    secret_args = [key for app in serve_config["applications"] for key in app.get("args", {})
                   if SECRET_NAME.search(key) and not key.endswith("_file")]
    assert secret_args == []
    text = MANIFEST.read_text(encoding="utf-8")
    assert "stringData" not in text
    assert [run for run in re.findall(r"[A-Za-z0-9+=_-]{32,}", text) if re.search(r"\d", run)] == []
