"""What the gateway's routes call, in one bundle the replica builds and its FastAPI app carries
(`app.state.services`); a route takes it through one dependency, `Services`. Unit tests build the app
around fakes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from deployments.gateway.answer_service import GatewayService
from deployments.gateway.embeddings_service import EmbeddingsService
from deployments.gateway.http_guard import GuardSettings
from deployments.gateway.kb_requests import KnowledgeBaseRequests
from deployments.gateway.readiness import Readiness


@dataclass(frozen=True)
class GatewayServices:
    answers: GatewayService
    embeddings: EmbeddingsService
    knowledge_bases: KnowledgeBaseRequests
    guard: GuardSettings
    readiness: Callable[[], Readiness]  # the last snapshot of the versions' readiness
    merged_stats: Callable[[float | None], Awaitable[dict[str, Any]]]  # every gateway replica's outcomes
    first_traffic: Callable[[], None]  # logs this replica's first request (once)
    rollout_state_file: Path


def gateway_services(request: Request) -> GatewayServices:
    services: GatewayServices = request.app.state.services
    return services


Services = Annotated[GatewayServices, Depends(gateway_services)]


def knowledge_base_requests(services: Services) -> KnowledgeBaseRequests:
    return services.knowledge_bases


KbRequests = Annotated[KnowledgeBaseRequests, Depends(knowledge_base_requests)]
