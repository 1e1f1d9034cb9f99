"""Names, help texts and buckets of the service's metrics (exported by Ray with a `ray_` prefix).

Kept here so the deployments, the Grafana dashboard and the tests agree on one spelling.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str
    description: str
    tags: tuple[str, ...] = ("version",)
    buckets: tuple[float, ...] = ()


REQUESTS_IN_FLIGHT = MetricSpec("rag_requests_in_flight", "Requests in progress in this replica.")
MODEL_LOAD_SECONDS = MetricSpec("rag_model_load_seconds", "Seconds a stage took to load and warm up.", ("version",))
VECTOR_SEARCH_MS = MetricSpec("rag_vector_search_ms", "FAISS search latency in milliseconds.",
                              ("version", "knowledge_base"), (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250))
SHUTDOWN_GRACE_USED_SECONDS = MetricSpec("rag_shutdown_grace_used_seconds",
                                         "Seconds from the stop request to the end of cleanup.")
TIME_TO_FIRST_TOKEN_SECONDS = MetricSpec("rag_time_to_first_token_seconds",
                                         "Seconds from request arrival to the first answer text.",
                                         ("version",), (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
GENERATED_TOKENS = MetricSpec("rag_generated_tokens_total", "Answer pieces streamed to clients.")
REQUESTS = MetricSpec("rag_requests_total", "Requests answered, by endpoint, status and version.",
                      ("version", "endpoint", "status"))
LIFECYCLE_EVENTS = MetricSpec("rag_lifecycle_events_total",
                              "Replica lifecycle events (STARTUP, READY, SHUTDOWN, DRAINING, CLEANUP, ...).",
                              ("version", "event"))
_START_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300)
REPLICA_START_SECONDS = MetricSpec("rag_replica_start_seconds",
                                   "Seconds a replica's start took, by part: load (model, index) and warmup.",
                                   ("version", "part"), _START_BUCKETS)
# `stage`, not `deployment`: Serve reserves that label for the replica that records a metric.
REPLICAS = MetricSpec("rag_replicas", "Running replicas per version and stage (deployment), as the gateway sees them.",
                      ("version", "stage"))
COLD_START_WAITS = MetricSpec("rag_cold_start_waits_total",
                              "Requests that arrived while a stage of their version was at zero replicas.")
COLD_START_WAIT_SECONDS = MetricSpec("rag_cold_start_wait_seconds",
                                     "Seconds such a request waited for its answer to start.", ("version",),
                                     _START_BUCKETS)
_SHARE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
SHADOW_COPIES = MetricSpec("rag_shadow_copies_total",
                           "Questions copied to a rollout's candidate, by candidate version and result (ok, the "
                           "candidate's error, the stable answer's failure, or why the copy was dropped).",
                           ("version", "result"))
SHADOW_SOURCE_OVERLAP = MetricSpec("rag_shadow_source_overlap",
                                   "Rank-biased overlap of the candidate's and the stable answer's source files.",
                                   ("version",), _SHARE_BUCKETS)
SHADOW_ANSWER_SIMILARITY = MetricSpec("rag_shadow_answer_similarity",
                                      "Cosine similarity of the candidate's and the stable answer's embeddings.",
                                      ("version",), _SHARE_BUCKETS)
GOLDEN_SCORE = MetricSpec("rag_golden_score",
                          "A version's last golden-set score on a knowledge base, by measure (recall@1/3/5, mrr, "
                          "citation_rate, words_rate), as scripts.evaluate or a rollout reported it.",
                          ("version", "knowledge_base", "measure"))

UPSTREAM_REQUESTS = MetricSpec("rag_upstream_requests_total",
                               "Requests to an upstream LLM server (the openai backend), by model and result "
                               "(ok, cancelled, rate_limited, refused, unavailable, broken).",
                               ("version", "model", "result"))
UPSTREAM_FIRST_TOKEN_SECONDS = MetricSpec("rag_upstream_first_token_seconds",
                                          "Seconds from the request to the upstream to its first answer text.",
                                          ("version", "model"), (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
UPSTREAM_TOKENS = MetricSpec("rag_upstream_tokens_total", "Tokens an upstream LLM server generated (its usage).",
                             ("version", "model"))

ALL = (REQUESTS_IN_FLIGHT, MODEL_LOAD_SECONDS, VECTOR_SEARCH_MS, SHUTDOWN_GRACE_USED_SECONDS,
       TIME_TO_FIRST_TOKEN_SECONDS, GENERATED_TOKENS, REQUESTS, LIFECYCLE_EVENTS, REPLICA_START_SECONDS,
       REPLICAS, COLD_START_WAITS, COLD_START_WAIT_SECONDS, SHADOW_COPIES, SHADOW_SOURCE_OVERLAP,
       SHADOW_ANSWER_SIMILARITY, GOLDEN_SCORE, UPSTREAM_REQUESTS, UPSTREAM_FIRST_TOKEN_SECONDS, UPSTREAM_TOKENS)
