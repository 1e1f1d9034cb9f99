"""Application builders named by `serve_config.yaml`: config validated once, here, then passed typed."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.embedder import EmbedderDeployment
from deployments.gateway import GatewayDeployment
from deployments.generator import GeneratorDeployment
from deployments.kb_manager import KnowledgeBaseManager
from deployments.pipeline import PipelineDeployment
from deployments.retriever import RetrieverDeployment
from rag.config import GatewayConfig, PipelineConfig, validate


def build_pipeline_app(args: dict[str, Any]) -> Application:
    """One pipeline version: Embedder, Retriever and Generator behind a Pipeline entry point."""
    config = validate(PipelineConfig, args, "pipeline application args")
    return PipelineDeployment.bind(config, EmbedderDeployment.bind(config), RetrieverDeployment.bind(config),
                                   GeneratorDeployment.bind(config))


def build_gateway_app(args: dict[str, Any]) -> Application:
    """The HTTP gateway that routes between pipeline versions by the weights in its user_config."""
    config = validate(GatewayConfig, args, "gateway application args")
    return GatewayDeployment.bind(config, KnowledgeBaseManager.bind(config))
