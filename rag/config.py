"""The service's configuration schema: validated once, at the edge, then passed down typed.

`serve_config.yaml` is the only file these values are written in: each pipeline version's
application gets a `PipelineConfig` as its `args`, the gateway gets a `GatewayConfig`, and the
gateway's `user_config` is a `TrafficConfig`. Scripts (ingest, demo) read the same file.
"""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rag.constants import BUNDLED_EMBEDDING_MODEL, resolve_path
from rag.errors import InvalidRequestError, RagError

Device = Literal["auto", "cpu", "cuda"]
EmbeddingRuntime = Literal["auto", "openvino", "onnx", "torch"]
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# A KB name becomes one path component under kb_root: no separators, no leading dot, so no
# traversal, absolute path or hidden (staging) name can be spelt with it.
KB_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
_SHOWN_NAME_CHARS = 40  # a refusal quotes this much of a bad name, never megabytes
T = TypeVar("T", bound=BaseModel)


def check_kb_name(name: object) -> str:
    """`name` itself when it is a valid knowledge-base name; else `InvalidRequestError` quoting it (truncated).

    Every path built from a KB name goes through this, so the pattern is the only thing that keeps
    a name inside kb_root.
    """
    # fullmatch, not match: `$` would let a trailing newline through.
    if isinstance(name, str) and re.fullmatch(KB_NAME_PATTERN, name):
        return name
    raise InvalidRequestError(f"invalid knowledge base name {_shown(name)}: use 1-63 letters, digits, '_' or '-', "
                              "starting with a letter or digit")


def is_kb_name(name: object) -> bool:
    """Whether `name` is a valid knowledge-base name (for filtering folders, where a refusal is no error)."""
    try:
        check_kb_name(name)
    except InvalidRequestError:
        return False
    return True


def _shown(value: object) -> str:
    if isinstance(value, str) and len(value) > _SHOWN_NAME_CHARS:
        return f"{value[:_SHOWN_NAME_CHARS]!r}... ({len(value)} chars)"
    return repr(value)


def _kb_name_field(name: str) -> str:
    # pydantic reports ValueError as a validation error; our InvalidRequestError is not one.
    try:
        return check_kb_name(name)
    except InvalidRequestError as exc:
        raise ValueError(str(exc)) from None


KnowledgeBaseName = Annotated[str, AfterValidator(_kb_name_field)]


class ConfigError(RagError, ValueError):
    """A configuration that does not validate; the message names each bad key and value."""


class _Strict(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddingConfig(_Strict):
    model: str = Field(BUNDLED_EMBEDDING_MODEL, description="bundled package name, local path or hub id")
    device: Device = "auto"
    # Texts per forward pass, sorted by length: 16 embeds the most chunks/s on the CPU runtimes (OpenVINO bf16,
    # one thread: 76 against 65 at 64; PyTorch is about even).
    batch_size: int = Field(16, ge=1, le=4096)
    max_batch_size: int = Field(32, ge=1, le=1024, description="questions merged per forward pass in Serve")
    # 0: a lone question runs at once, and those that arrive meanwhile share the next pass (rag.coalescing);
    # above 0 a batch that is not full waits that long for company first.
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1)
    # What the model's vectors mean anything for: the bundled MiniLM is English-only. `retrieval.mode:
    # auto` lets BM25 lead for text in other languages. A multilingual model declares e.g. [zh, en].
    languages: list[Annotated[str, Field(pattern=r"^[a-z]{2}$")]] = Field(
        default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes the model covers")
    # Models trained with an instruction on the query side (bge-*-zh: "为这个句子生成表示以用于检索相关文章：")
    # expect it before every question, never before documents.
    query_prefix: str = Field("", max_length=500)
    # auto: OpenVINO on a CPU (3x PyTorch's speed for a question and 7x for ingest there, vectors
    # interchangeable with it; see rag.embedding_runtime), PyTorch where the replica's device is a GPU.
    runtime: EmbeddingRuntime = "auto"
    # int8 (onnx only): dynamically quantised weights, faster on CPUs without bf16, but its vectors differ
    # enough to reorder results, so its indexes are another vector space: switching is a model switch.
    quantization: Literal["none", "int8"] = "none"
    # auto: what the CPU computes fastest without changing results (bf16 where it has AMX); fp32: exact.
    precision: Literal["auto", "fp32"] = "auto"
    threads: int = Field(1, ge=1, le=256, description="CPU threads for questions (the query lane)")
    ingest_threads: int = Field(0, ge=0, le=256, description="CPU threads for ingest batches; 0: every core")
    # Where the CPU runtimes' ONNX export is kept (made once per model and node; rag.embedding_export).
    cache_dir: Path = Path("var/models")

    @model_validator(mode="after")
    def _runtime_fits(self) -> EmbeddingConfig:
        if self.quantization == "int8" and self.runtime != "onnx":
            raise ValueError("quantization int8 needs runtime onnx (ONNX Runtime's dynamic int8)")
        if self.device == "cuda" and self.runtime in ("openvino", "onnx"):
            raise ValueError(f"runtime {self.runtime} runs on the CPU; device cuda needs runtime torch (or auto)")
        return self

    @property
    def vector_space(self) -> str:
        """What an index's vectors are comparable with: the model, and its quantisation when vectors move
        with it. Stored as the index's `embedding_model`; a version serves only indexes of its own."""
        return self.model if self.quantization == "none" else f"{self.model}+{self.quantization}"


class SplitterConfig(_Strict):
    chunk_size: int = Field(750, ge=50, le=20_000)
    chunk_overlap: int = Field(150, ge=0)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> SplitterConfig:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_size ({self.chunk_size})")
        return self


def _sample_kb() -> dict[str, int | Literal["latest"]]:
    return {"samples": "latest"}


# A lease must outlive a few missed heartbeats (a tick busy loading a large index), or a prune
# could delete a version a live replica still serves.
LEASE_HEARTBEATS_PER_TTL = 3


class RetrievalConfig(_Strict):
    kb_root: Path = Path("var/kb")
    # Which knowledge bases this pipeline serves: an int pins an index version for the replica's life,
    # "latest" follows new versions as they are published (see refresh_interval_s).
    knowledge_bases: dict[KnowledgeBaseName, int | Literal["latest"]] = Field(default_factory=_sample_kb)
    discover: bool = Field(False, description="also serve, and follow, every other knowledge base under kb_root")
    refresh_interval_s: float = Field(1.0, ge=0, le=3600, description="how often a replica looks for new "
                                      "versions of the knowledge bases it follows; 0: only when it starts")
    lease_ttl_s: float = Field(30.0, gt=0, le=86_400, description="a replica's note of the versions it serves "
                               "protects them from pruning this long after its last heartbeat")
    top_k: int = Field(3, ge=1, le=50)
    score_threshold: float = Field(0.0, ge=-1.0, le=1.0, description="minimum cosine similarity")
    device: Device = "auto"
    # hybrid: dense and BM25 rankings fused (rag.lexical.fuse); dense: the embedding alone; auto: hybrid
    # where embedding.languages covers the KB's and the question's language, else BM25 leads (rag.language).
    mode: Literal["auto", "dense", "hybrid"] = "auto"
    hybrid_candidates: int = Field(50, ge=1, le=1000, description="chunks each ranking offers the fusion")
    dense_weight: float = Field(0.75, ge=0, le=1, description="the dense ranking's share of a fused score")

    @field_validator("knowledge_bases")
    @classmethod
    def _names_and_versions(cls, value: dict[str, int | str]) -> dict[str, int | str]:
        if not value:
            raise ValueError("at least one knowledge base is needed")
        for name, version in value.items():
            if isinstance(version, int) and version < 1:
                raise ValueError(f"knowledge base {name!r}: version {version} must be >= 1 or 'latest'")
        return value

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> RetrievalConfig:
        if self.refresh_interval_s and self.lease_ttl_s < LEASE_HEARTBEATS_PER_TTL * self.refresh_interval_s:
            raise ValueError(
                f"lease_ttl_s ({self.lease_ttl_s}) must be at least {LEASE_HEARTBEATS_PER_TTL} x refresh_interval_s "
                f"({self.refresh_interval_s}): replicas renew their leases once per refresh, and a lease that "
                "expires between two renewals lets a prune delete an index version still being served")
        return self

    @property
    def heartbeat_interval_s(self) -> float:
        """How often a replica renews its leases: each refresh, or often enough without refreshes."""
        return self.refresh_interval_s or self.lease_ttl_s / LEASE_HEARTBEATS_PER_TTL

    @property
    def kb_root_path(self) -> Path:
        return resolve_path(self.kb_root)


class GenerationConfig(_Strict):
    backend: Literal["extractive", "transformers", "openai"] = "extractive"
    model: str | None = Field(None, description="transformers: local path or hub id; openai: the upstream's "
                              "model name; required by both")
    device: Device = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_new_tokens: int = Field(256, ge=1, le=32_768)
    max_stream_seconds: float = Field(60.0, gt=0, le=3600)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    extractive_sentences: int = Field(4, ge=1, le=50)
    extractive_piece_delay_s: float = Field(0.0, ge=0, le=5, description="pause between streamed pieces")
    stream_batch_window_s: float = Field(0.02, ge=0, le=1, description="pieces gathered per message between "
                                         "replicas after the first one")
    warmup_tokens: int = Field(4, ge=1, le=64)
    trust_remote_code: bool = False
    # Continuous batching (transformers backend): concurrent streams share each forward pass.
    max_batch_streams: int = Field(64, ge=1, le=1024, description="requests decoded together per forward pass")
    max_batch_tokens: int | None = Field(None, ge=16, le=1 << 20, description="tokens per forward pass "
                                         "(prefill chunks and decode steps); null: sized from device memory")
    kv_cache_tokens: int | None = Field(None, ge=64, le=1 << 24, description="KV cache size in tokens; null: "
                                        "from free device memory on CUDA, 32768 on CPU")
    compile_level: int = Field(0, ge=0, le=3, description="transformers' torch.compile preset on CUDA, "
                               "compiled during warm-up; 0 leaves it off")
    # The openai backend: an OpenAI-compatible server the team already runs (vLLM, Ollama, Xinference, ...).
    base_url: str | None = Field(None, pattern=r"^https?://", description="openai backend: the upstream's API "
                                 "root, e.g. http://127.0.0.1:8001/v1")
    api_key_file: Path | None = Field(None, description="openai backend: a file whose first line is the "
                                      "upstream's key (relative to the project root); never the key itself here")
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="openai backend: or the environment variable holding the key")
    headers: dict[str, str] = Field(default_factory=dict, description="openai backend: extra headers to the "
                                    "upstream (not for keys: this file is no place for secrets)")
    max_connections: int = Field(32, ge=1, le=4096, description="openai backend: connections to the upstream "
                                 "per Generator replica; more streams wait for one")
    connect_timeout_s: float = Field(5.0, gt=0, le=600)
    first_token_timeout_s: float = Field(30.0, gt=0, le=3600, description="openai backend: an upstream that "
                                         "sends no token by then fails the request (retried on another version)")
    inter_token_timeout_s: float = Field(30.0, gt=0, le=3600, description="openai backend: a stream silent "
                                         "this long is broken")
    health_misses: int = Field(3, ge=1, le=100, description="openai backend: failed upstream probes in a row "
                               "before check_health fails")

    @model_validator(mode="after")
    def _model_for_backend(self) -> GenerationConfig:
        if self.backend in ("transformers", "openai") and not self.model:
            raise ValueError(f"generation.model is required when generation.backend is {self.backend!r}")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("generation.base_url (the upstream's OpenAI-compatible API) is required when "
                             "generation.backend is 'openai'")
        secret = sorted(h for h in self.headers if h.lower() in ("authorization", "api-key", "x-api-key"))
        if secret:
            raise ValueError(f"generation.headers must not carry a key ({', '.join(secret)}): name a file in "
                             "generation.api_key_file or a variable in generation.api_key_env")
        return self


class LifecycleConfig(_Strict):
    # Extra seconds a replica waits inside warm-up: lets tests watch /ready go 503 -> 200.
    warmup_delay_s: float = Field(0.0, ge=0, le=600)
    # Head room between the longest stream and the drain deadline: retrieval before the first token,
    # the drain loop's polling period, and the hop through the gateway all come on top.
    drain_margin_s: float = Field(10.0, ge=0, le=600)


class FaultConfig(_Strict):
    """Fault injection, off by default: makes a version fail or slow down so rollback can be shown."""

    error_rate: float = Field(0.0, ge=0, le=1, description="fraction of answers that fail before the first byte")
    extra_latency_s: float = Field(0.0, ge=0, le=60, description="delay added before each answer starts")


class PipelineConfig(_Strict):
    """One complete pipeline version: models, knowledge-base index versions and settings."""

    version: str = Field("v1", pattern=VERSION_PATTERN)
    revision: Annotated[str, BeforeValidator(str)] = Field(
        "1", description="bump to make `serve deploy` restart replicas on a code change")
    embedding: EmbeddingConfig = EmbeddingConfig()
    splitter: SplitterConfig = SplitterConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    generation: GenerationConfig = GenerationConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    faults: FaultConfig = FaultConfig()


class TrafficConfig(_Strict):
    """Traffic weights per version: the gateway's `user_config`, changeable without restarts."""

    weights: dict[str, float] = Field(default_factory=lambda: {"v1": 100.0})
    # Set by the graceful stop: /ready turns 503 "draining" and new requests are refused with 503.
    draining: bool = False
    # Set by `rollout start` during its shadow stage and steps: the candidate version that gets a copy
    # of requests answered by another version (the user sees only the other's answer).
    shadow: str | None = Field(None, pattern=VERSION_PATTERN)

    @field_validator("weights")
    @classmethod
    def _some_traffic(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            if not re.match(VERSION_PATTERN, name):
                raise ValueError(f"version name {name!r} must match {VERSION_PATTERN}")
            if weight < 0:
                raise ValueError(f"weight of version {name!r} is {weight}; weights must be >= 0")
        if not any(w > 0 for w in value.values()):
            raise ValueError(f"at least one version needs a weight > 0, got {value}")
        return value


class ShadowConfig(_Strict):
    """The shadow stage of a rollout: users' answers copied to the candidate and compared pair by pair
    (the gateway mirrors within the bounds here; the judge decides by the thresholds). A copy is a
    sample whatever version a sticky user is routed to, so a few users suffice."""

    enabled: bool = Field(True, description="start every rollout with a shadow stage (`--no-shadow` skips it)")
    min_pairs: int = Field(20, ge=1, le=100_000, description="compared pairs needed before the stage is judged")
    max_s: float = Field(180.0, gt=0, le=86_400, description="a stage without min_pairs by then is inconclusive")
    # One copy a second adds a tenth to the work of 10 answers/s: on 2 cores the users' p50 time to first
    # token stays within 1.2x (bench_rollout's quality scenarios); 20 pairs take about 20 s.
    rate_per_s: float = Field(1.0, gt=0, le=1000, description="copies started per second, per gateway replica")
    max_in_flight: int = Field(2, ge=1, le=256, description="copies running at once, per gateway replica")
    # On a quiet service one copy a second can be a third of the work: copies also stay below this share
    # of the answered requests, so the users' latency holds at any traffic.
    max_share: float = Field(0.25, gt=0, le=1, description="copies per answered request, per gateway replica")
    max_user_in_flight: int = Field(16, ge=1, le=10_000,
                                    description="no copies while a gateway replica holds this many user requests")
    timeout_s: float = Field(60.0, gt=0, le=600, description="a copy's whole answer; later is an error")
    # Judged per stage on the mean over its pairs, each distinct question weighing once. An unchanged
    # version scores 1.0 on all three.
    min_source_overlap: float = Field(0.8, ge=0, le=1, description="rank-biased overlap of the source files")
    min_cited_share: float = Field(0.7, ge=0, le=1,
                                   description="of the sources the stable answer cites, the share the candidate cites")
    min_answer_similarity: float = Field(0.8, ge=0, le=1, description="cosine of the two answers' embeddings")


class QualityConfig(_Strict):
    """Golden sets in a rollout: every knowledge base the candidate serves that has one (`eval.jsonl`) is
    evaluated on candidate and stable when the candidate first serves, and again before promotion."""

    enabled: bool = Field(True, description="run the golden sets (a KB without one is simply not evaluated)")
    max_recall_drop: float = Field(0.05, ge=0, le=1, description="candidate recall@5 may be this much below stable's")
    max_citation_drop: float = Field(0.1, ge=0, le=1,
                                     description="candidate citation rate may be this much below stable's")


class RolloutConfig(_Strict):
    """How `rollout start` moves traffic to a new version and when it gives up on it."""

    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0])
    interval_s: float = Field(30.0, gt=0, le=3600, description="observation time at each step")
    min_requests: int = Field(20, ge=1, description="canary requests needed before a step is judged")
    max_wait_intervals: int = Field(4, ge=1, le=100, description="intervals to wait for min_requests")
    max_error_rate_increase: float = Field(0.02, ge=0, le=1, description="canary minus stable error rate")
    max_ttft_ratio: float = Field(2.0, ge=1, description="canary tail time to first token / stable's: p99 when "
                                  "both versions have 100 samples in the window, p90 from 10, else p50")
    ttft_slack_s: float = Field(0.05, ge=0, description="tail differences below this never count")
    drain_timeout_s: float = Field(300.0, gt=0, description="wait for the old version's in-flight to reach 0")
    start_timeout_s: float = Field(180.0, gt=0, le=3600, description="a new version that is not serving by "
                                   "then is rolled back, with Serve's message for each stuck deployment")
    on_inconclusive: Literal["rollback", "hold"] = Field(
        "rollback", description="when a step cannot be judged (no stats, too few answers): roll back, or hold "
        "the weights where they are for an operator to resume or abort; never promote")
    shadow: ShadowConfig = ShadowConfig()
    quality: QualityConfig = QualityConfig()

    @field_validator("steps")
    @classmethod
    def _increasing_to_100(cls, value: list[float]) -> list[float]:
        if not value or value[-1] != 100 or value[0] <= 0 or any(b <= a for a, b in pairwise(value)):
            raise ValueError(f"steps must increase from above 0 and end at 100, got {value}")
        return value


class LimitsConfig(_Strict):
    """What one HTTP request may carry, enforced at the gateway before any work starts.

    The request schemas in `rag.api` state the defaults in the OpenAPI description, so a limit other than
    the body size may only be lowered here (a request over a lowered limit gets 400), never raised past
    what the schema promises."""

    max_body_bytes: int = Field(1_048_576, ge=1024, le=67_108_864, description="413 above this")
    # As long as any message may be: the question is the last user message, and a schema cannot tell the
    # last message from the others (a pasted log or document is a fair question).
    max_question_chars: int = Field(16_000, ge=1, le=16_000, description="the question (last user message)")
    max_message_chars: int = Field(16_000, ge=1, le=16_000, description="each message or history turn")
    max_messages: int = Field(64, ge=1, le=64, description="messages of a chat request, history turns of kb_chat")
    max_tokens: int = Field(4096, ge=1, le=4096)
    max_top_k: int = Field(50, ge=1, le=50)
    validation_errors_shown: int = Field(3, ge=1, le=20, description="a 422 names this many problems, then counts")
    # The gateway's own clock, not the client's: Serve's proxy lets a client set its request's timeout.
    body_timeout_s: float = Field(10.0, gt=0, le=600, description="408 when a body has not arrived by then")


class ParseLimits(_Strict):
    """Each uploaded document is parsed in a child process of its own under these limits (rag/parsing.py):
    a file over one fails alone, naming the file and the limit, and the manager keeps answering."""

    slots: int = Field(2, ge=1, le=32, description="documents parsed at once by one manager replica")
    cpu_s: int = Field(30, ge=1, le=3600, description="CPU seconds to load and split one document")
    wall_s: float = Field(60.0, gt=0, le=7200, description="seconds before a document's parser is stopped")
    memory_mb: int = Field(1024, ge=256, le=65536, description="address space of one document's parser")


class TemporaryKbSettings(_Strict):
    """Temporary knowledge bases (Chatchat's file chat): files uploaded to chat over for a while, built like
    any upload, never listed, and deleted when idle and when the knowledge-base manager restarts."""

    max_count: int = Field(20, ge=1, le=10_000, description="temporary KBs at once; one more gets 503")
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=1024 ** 3, description="one upload_temp_docs body")
    max_files: int = Field(20, ge=1, le=1000, description="files in one upload_temp_docs request")
    max_chunks: int = Field(4000, ge=1, le=1_000_000, description="chunks one upload may add (about 4 minutes "
                            "of embedding on 2 cores)")
    idle_ttl_s: float = Field(3600.0, ge=10, le=30 * 86_400, description="deleted after this long without a "
                              "chat, search or upload")


class KnowledgeBaseSettings(_Strict):
    """Knowledge bases managed over HTTP: what an upload may carry and how long a request waits for it.

    Where the KBs live, how documents are split and which model embeds them come from the serving
    pipeline version (its `retrieval.kb_root`, `splitter`, `embedding`), the same settings queries use."""

    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=1024 ** 3, description="one upload_docs body")
    upload_timeout_s: float = Field(300.0, gt=0, le=3600, description="408 when an upload has not arrived by then")
    max_file_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=1024 ** 3, description="one uploaded file")
    max_files: int = Field(200, ge=1, le=10_000, description="files in one upload_docs request")
    wait_s: float = Field(120.0, gt=0, le=600, description="an upload with wait=true answers by then; "
                          "after that, 202 and the job to poll")
    keep_versions: int = Field(3, ge=1, le=1000, description="index versions kept besides those still in use")
    embed_batch: int = Field(256, ge=1, le=8192, description="chunks per call to the Embedder while ingesting")
    max_chunks_per_upload: int = Field(20_000, ge=1, le=10_000_000, description="chunks one upload may add "
                                       "(about 20 minutes of embedding on 2 cores); a larger one is refused")
    max_jobs_per_kb: int = Field(4, ge=1, le=1000, description="jobs queued or running per knowledge base; "
                                 "more get 503 with Retry-After")
    max_jobs: int = Field(16, ge=1, le=10_000, description="jobs queued or running in all")
    parsing: ParseLimits = ParseLimits()
    temporary: TemporaryKbSettings = TemporaryKbSettings()
    stop_drain_s: float = Field(100.0, ge=0, le=3600, description="a stopping manager lets running jobs finish "
                                "this long, then records them as interrupted (below its graceful_shutdown_timeout_s)")


class GatewayConfig(_Strict):
    """Settings of the HTTP ingress."""

    default_knowledge_base: KnowledgeBaseName = "samples"
    max_history_turns: int = Field(20, ge=0, le=500, description="older turns are dropped, not refused")
    first_event_timeout_s: float = Field(30.0, gt=0, description="wait for a version's first event")
    request_timeout_s: float = Field(30.0, gt=0, le=600,
                                     description="search_docs, /v1/models, each Embedder call of /v1/embeddings")
    ready_poll_interval_s: float = Field(1.0, gt=0, le=60)
    stats_window_records: int = Field(20_000, ge=100, le=1_000_000, description="per-version request records kept")
    # Keys live in a file (a Kubernetes secret mounts as one), never in this config; one key per line so
    # two can be live during a rotation. Relative paths are taken from the project root.
    api_key_file: Path = Path("var/api_key")
    # Serve every route without a key: only for a gateway on loopback (check_serve_config refuses others;
    # the running gateway also answers only requests from this machine, under these names, not cross-site).
    allow_unauthenticated: bool = False
    allowed_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost", "::1"], min_length=1,
                                     description="Host names a gateway without keys answers to")
    limits: LimitsConfig = LimitsConfig()
    knowledge_base: KnowledgeBaseSettings = KnowledgeBaseSettings()
    # Where `rollout start` keeps its state (next to the config it changes): GET /rollout shows it to the
    # console. Relative paths are taken from the project root.
    rollout_state_file: Path = Path("serve_config.yaml.rollout.json")
    rollout: RolloutConfig = RolloutConfig()

    @property
    def api_key_path(self) -> Path:
        return resolve_path(self.api_key_file)


def _describe(error: ValidationError, where: str) -> str:
    lines = [f"invalid {where}:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(root)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {key}: {item['msg']}{shown}")
    return "\n".join(lines)


def validate(schema: type[T], data: Any, where: str) -> T:
    """`schema.model_validate(data)`, raising a `ConfigError` that names every bad key and value."""
    try:
        return schema.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where)) from None
