"""Application builders named by `serve_config.yaml`: config validated once, here, then passed typed."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.gateway.gateway_deployment import GatewayDeployment
from deployments.gateway.kb_manager_deployment import KnowledgeBaseManager
from deployments.stages.embedder_deployment import EmbedderDeployment
from deployments.stages.generator_deployment import GeneratorDeployment
from deployments.stages.pipeline_deployment import PipelineDeployment
from deployments.stages.retriever_deployment import RetrieverDeployment
from rag.config import GatewayConfig, PipelineConfig, validate

# `@serve.deployment` turns each class into a Deployment with `bind`; Ray's typing keeps the class type,
# hence the narrow ignores below.


def build_pipeline_app(args: dict[str, Any]) -> Application:
    """One pipeline version: Embedder, Retriever and Generator behind a Pipeline entry point."""
    config = validate(PipelineConfig, args, "pipeline application args")
    return PipelineDeployment.bind(  # type: ignore[attr-defined]
        config, EmbedderDeployment.bind(config), RetrieverDeployment.bind(config),  # type: ignore[attr-defined]
        GeneratorDeployment.bind(config))  # type: ignore[attr-defined]


def build_gateway_app(args: dict[str, Any]) -> Application:
    """The HTTP gateway that routes between pipeline versions by the weights in its user_config."""
    config = validate(GatewayConfig, args, "gateway application args")
    return GatewayDeployment.bind(config, KnowledgeBaseManager.bind(config))  # type: ignore[attr-defined]
