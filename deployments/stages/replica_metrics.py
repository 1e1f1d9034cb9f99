"""Ray metric objects for the specs in `rag.metrics`; `ray.serve.metrics` adds deployment, replica
and application labels by itself."""

from __future__ import annotations

from typing import Any

from ray.serve import metrics

from rag import metrics as spec
from rag.shadow import OK, Dropped, Pair


def _make(kind: type, s: spec.MetricSpec) -> Any:
    if kind is metrics.Histogram:
        # Ray annotates tag_keys as tuple[str] (one element) where it takes any tuple of names.
        return metrics.Histogram(s.name, description=s.description, boundaries=list(s.buckets),
                                 tag_keys=s.tags)  # type: ignore[arg-type]
    return kind(s.name, description=s.description, tag_keys=s.tags)


class StageMetrics:
    """The metrics one replica records, created inside the replica (Ray must be initialised)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.in_flight = _make(metrics.Gauge, spec.REQUESTS_IN_FLIGHT)
        self.model_load = _make(metrics.Gauge, spec.MODEL_LOAD_SECONDS)
        self.vector_search = _make(metrics.Histogram, spec.VECTOR_SEARCH_MS)
        self.grace_used = _make(metrics.Gauge, spec.SHUTDOWN_GRACE_USED_SECONDS)
        self.first_token = _make(metrics.Histogram, spec.TIME_TO_FIRST_TOKEN_SECONDS)
        self.tokens = _make(metrics.Counter, spec.GENERATED_TOKENS)
        self.requests = _make(metrics.Counter, spec.REQUESTS)
        self.lifecycle_events = _make(metrics.Counter, spec.LIFECYCLE_EVENTS)
        self.start_parts = _make(metrics.Histogram, spec.REPLICA_START_SECONDS)
        self.replicas = _make(metrics.Gauge, spec.REPLICAS)
        self._replicas_seen: set[tuple[str, str]] = set()
        self.cold_waits = _make(metrics.Counter, spec.COLD_START_WAITS)
        self.cold_wait_seconds = _make(metrics.Histogram, spec.COLD_START_WAIT_SECONDS)
        self.shadow_copies = _make(metrics.Counter, spec.SHADOW_COPIES)
        self.shadow_overlap = _make(metrics.Histogram, spec.SHADOW_SOURCE_OVERLAP)
        self.shadow_similarity = _make(metrics.Histogram, spec.SHADOW_ANSWER_SIMILARITY)
        self.golden = _make(metrics.Gauge, spec.GOLDEN_SCORE)
        self.upstream_requests = _make(metrics.Counter, spec.UPSTREAM_REQUESTS)
        self.upstream_first_token = _make(metrics.Histogram, spec.UPSTREAM_FIRST_TOKEN_SECONDS)
        self.upstream_tokens = _make(metrics.Counter, spec.UPSTREAM_TOKENS)
        for metric in (self.in_flight, self.model_load, self.vector_search, self.grace_used, self.first_token,
                       self.tokens, self.requests, self.lifecycle_events, self.start_parts, self.cold_waits,
                       self.cold_wait_seconds):
            metric.set_default_tags({"version": version})
        self.in_flight.set(0)

    def started(self, **parts: float) -> None:
        for part, seconds in parts.items():
            self.start_parts.observe(seconds, tags={"part": part})

    def set_replicas(self, running: dict[str, dict[str, int]]) -> None:
        """Running replicas per version and deployment (the gateway's readiness poll); a version or stage
        that is gone reads 0 rather than its last count."""
        now = {(version, stage): count for version, stages in running.items() for stage, count in stages.items()}
        for version, stage in self._replicas_seen - now.keys():
            self.replicas.set(0, tags={"version": version, "stage": stage})
        for (version, stage), count in now.items():
            self.replicas.set(count, tags={"version": version, "stage": stage})
        self._replicas_seen = set(now)

    def cold_start_waited(self, version: str, seconds: float | None) -> None:
        self.cold_waits.inc(tags={"version": version})
        if seconds is not None:
            self.cold_wait_seconds.observe(seconds, tags={"version": version})

    def shadow_result(self, version: str, record: Pair | Dropped) -> None:
        tags = {"version": version}
        if isinstance(record, Dropped):
            self.shadow_copies.inc(tags={**tags, "result": f"dropped: {record.reason}"})
            return
        result = ("ok" if record.candidate_status == OK else f"candidate {record.candidate_status}") \
            if record.stable_status == OK else f"stable {record.stable_status}"
        self.shadow_copies.inc(tags={**tags, "result": result})
        if record.source_overlap is not None:
            self.shadow_overlap.observe(record.source_overlap, tags=tags)
        if record.answer_similarity is not None:
            self.shadow_similarity.observe(record.answer_similarity, tags=tags)

    def golden_scores(self, version: str, knowledge_base: str, scores: dict[str, float | None]) -> None:
        for measure, value in scores.items():
            if value is not None:
                self.golden.set(value, tags={"version": version, "knowledge_base": knowledge_base, "measure": measure})

    def upstream_result(self, model: str, result: str, first_token_s: float | None, tokens: int) -> None:
        """One request to an upstream LLM server (the openai backend), labelled by its model."""
        tags = {"version": self.version, "model": model}
        self.upstream_requests.inc(tags={**tags, "result": result})
        if first_token_s is not None:
            self.upstream_first_token.observe(first_token_s, tags=tags)
        if tokens:
            self.upstream_tokens.inc(tokens, tags=tags)

    def set_in_flight(self, count: int) -> None:
        self.in_flight.set(count)

    def count_event(self, event: str) -> None:
        self.lifecycle_events.inc(tags={"event": event})

    def count_request(self, endpoint: str, status: int | str, version: str | None = None) -> None:
        self.requests.inc(tags={"version": version or self.version, "endpoint": endpoint, "status": str(status)})
