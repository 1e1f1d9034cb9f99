"""The control plane starts without Ray: every `control` module loads with no Ray, FastAPI, Starlette
or Serve adapter imported, so `rollout status` and these unit tests start fast. And the library knows
none of the names the control plane keeps (builders, deployments)."""

from __future__ import annotations

import ast

from control import serve_config
from tests.support.imports import REPO_ROOT, import_report, top_level_modules


def test_control_imports_no_ray() -> None:
    imported, forbidden = import_report("control", ["ray", "fastapi", "starlette", "deployments"])
    assert imported >= top_level_modules("control")
    assert forbidden == []


def test_the_library_names_no_builder_or_deployment() -> None:
    names = {serve_config.PIPELINE_BUILDER, serve_config.GATEWAY_BUILDER, serve_config.GATEWAY_DEPLOYMENT,
             serve_config.KB_MANAGER_DEPLOYMENT, *serve_config.STREAMING_DEPLOYMENTS}
    found = []
    for path in sorted((REPO_ROOT / "rag").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert found == []


def test_the_names_kept_here_are_the_ones_serve_deploys() -> None:
    from deployments import app
    from deployments.gateway.gateway_deployment import GatewayDeployment
    from deployments.gateway.kb_manager_deployment import KnowledgeBaseManager
    from deployments.stages.generator_deployment import GeneratorDeployment
    from deployments.stages.pipeline_deployment import PipelineDeployment

    assert callable(getattr(app, serve_config.PIPELINE_BUILDER))
    assert callable(getattr(app, serve_config.GATEWAY_BUILDER))
    assert GatewayDeployment.name == serve_config.GATEWAY_DEPLOYMENT
    assert KnowledgeBaseManager.name == serve_config.KB_MANAGER_DEPLOYMENT
    assert {PipelineDeployment.name, GeneratorDeployment.name} == set(serve_config.STREAMING_DEPLOYMENTS)
