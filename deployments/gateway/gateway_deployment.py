"""The Gateway deployment: one replica of the HTTP ingress. It builds its services (answers, embeddings,
knowledge-base requests, readiness, the shared statistics) and hands them to a FastAPI app built here,
in the replica (`serve.ingress()` late-bound: `__serve_build_asgi_app__`), so no route reaches for
Serve's replica context. The routes are in `answer_routes`, `kb_routes` and `console_routes`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.gateway.answer_service import GatewayService
from deployments.gateway.embeddings_service import EmbeddingsService
from deployments.gateway.http_app import build_http_app
from deployments.gateway.http_guard import GuardSettings
from deployments.gateway.kb_requests import KnowledgeBaseRequests, ServeManager
from deployments.gateway.readiness import ReadinessMonitor, read_app_states
from deployments.gateway.serve_handles import ServeHandles
from deployments.gateway.services import GatewayServices
from deployments.gateway.stats_board import report_forever, stats_board
from deployments.stages.replica_lifecycle import ReplicaLifecycle
from rag.auth import ApiKeys
from rag.config import GatewayConfig, TrafficConfig, validate
from rag.constants import resolve_path
from rag.kb_api import FILE_LIST_BODY_BYTES

logger = logging.getLogger("rag.gateway")


def _guard_settings(config: GatewayConfig) -> GuardSettings:
    if config.allow_unauthenticated:
        logger.warning("event=AUTH mode=none reason=allow_unauthenticated: every route is open to requests "
                       "from this machine under the names %s, changes from other sites' pages refused",
                       ", ".join(config.allowed_hosts))
        keys = None
    else:
        keys = ApiKeys(config.api_key_path)
        logger.info("event=AUTH mode=api_key file=%s", config.api_key_path)
    kbs = config.knowledge_base
    upload, temporary = "/knowledge_base/upload_docs", "/knowledge_base/upload_temp_docs"
    uploads = {upload: max(kbs.max_upload_bytes, config.limits.max_body_bytes),
               temporary: max(kbs.temporary.max_upload_bytes, config.limits.max_body_bytes),
               **{f"/knowledge_base/{route}": max(FILE_LIST_BODY_BYTES, config.limits.max_body_bytes)
                  for route in ("delete_docs", "update_docs")}}
    return GuardSettings(keys, config.limits.max_body_bytes, config.limits.validation_errors_shown, uploads,
                         config.limits.body_timeout_s, {upload: kbs.upload_timeout_s, temporary: kbs.upload_timeout_s},
                         frozenset(name.lower() for name in config.allowed_hosts), frozenset({upload, temporary}))


@serve.deployment(name="Gateway")
@serve.ingress()
class GatewayDeployment:
    async def __init__(self, config: GatewayConfig, kb_manager: DeploymentHandle) -> None:  # type: ignore[misc]
        self._life = ReplicaLifecycle("gateway")
        guard = _guard_settings(config)  # first: a missing key file fails the replica before it serves
        handles = ServeHandles()
        self.service = GatewayService(config, self._life.metrics, self._life.in_flight, handles,
                                      lambda: self.readiness.current.serving,
                                      cold_stages=lambda: self.readiness.current.scaled_to_zero)
        self.readiness = ReadinessMonitor(lambda: self.service.split.live, config.ready_poll_interval_s,
                                          read_app_states, self.service.prime,
                                          lambda: list(self.service.traffic.weights),
                                          lambda states: self._life.metrics.set_replicas(
                                              {name: app.running for name, app in states.items()}))
        self._board = stats_board(config.stats_window_records)
        self._stop_reporting = asyncio.Event()
        replica = serve.get_replica_context().replica_id.unique_id
        self._reporter = asyncio.create_task(report_forever(self._board, replica, self.service.stats,
                                                            self._stop_reporting))
        versions = self.service.serving_versions
        self._app = build_http_app(GatewayServices(
            answers=self.service,
            embeddings=EmbeddingsService(handles, versions, config.request_timeout_s),
            knowledge_bases=KnowledgeBaseRequests(ServeManager(kb_manager), handles, versions, config.knowledge_base,
                                                  config.request_timeout_s),
            guard=guard,
            readiness=lambda: self.readiness.current,
            merged_stats=self._merged_stats,
            first_traffic=self._life.log.first_traffic,
            rollout_state_file=resolve_path(config.rollout_state_file)))
        await self._life.start("HTTP routes and the readiness monitor", lambda: None, lambda: None)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    async def _merged_stats(self, window_s: float | None) -> dict[str, Any]:
        merged: dict[str, Any] = await self._board.summary.remote(window_s)
        return merged

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # Weights only: applied in place, no replica restart. Idempotent, as Serve may call it twice.
        traffic = validate(TrafficConfig, user_config, "Gateway user_config")
        self.service.set_traffic(traffic)
        logger.info("event=TRAFFIC_WEIGHTS weights=%s draining=%s", traffic.weights, traffic.draining)

    def __del__(self) -> None:
        stop_reporting = getattr(self, "_stop_reporting", None)
        if stop_reporting:
            stop_reporting.set()
        # A constructor that failed (a missing key file) left no readiness monitor to stop.
        readiness = getattr(self, "readiness", None)
        self._life.stop(readiness.stop if readiness else lambda: None)
