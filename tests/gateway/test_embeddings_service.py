"""EmbeddingsService against fake Embedder and Retriever handles (no Ray): which serving version answers
(its Embedder's model first, else the Retriever serving a KB of that name), the refusals (unknown model,
nothing serving, wrong dimensions), one `embed(text, False)` per text for a few texts and
one slice at a time through `embed_many` for many, tokens counted once, each hop's deadline, the response
shape in both encodings, and `describe` asked once per version."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from deployments.gateway.embeddings_service import FEW, SLICE, EmbeddingsService
from deployments.gateway.expiring import TRUSTED_S
from rag.api import EMBEDDING_INPUTS, EmbeddingRequest
from rag.errors import (
    InvalidRequestError,
    KnowledgeBaseNotFoundError,
    OverloadedError,
    ServiceUnavailableError,
    UpstreamTimeoutError,
)


class FakeRemote:
    """A handle method: `.remote(...)` returns a coroutine, as Serve's response is awaitable."""

    def __init__(self, method: Callable[..., Awaitable[Any]]) -> None:
        self._method = method

    def remote(self, *args: Any) -> Awaitable[Any]:
        return self._method(*args)


class FakeEmbedder:
    def __init__(self, model: str, dimension: int = 3) -> None:
        self.model, self.dimension = model, dimension
        self.described = 0
        self.embedded: list[tuple[str, bool]] = []
        self.slices: list[int] = []
        self.in_flight = self.most_in_flight = 0
        self.slice_delay_s = 0.0
        self.fail_with: BaseException | None = None
        self.counted: list[list[str]] = []
        self.describe = FakeRemote(self._describe)
        self.embed = FakeRemote(self._embed)
        self.embed_many = FakeRemote(self._embed_many)
        self.count_tokens = FakeRemote(self._count_tokens)

    async def _describe(self) -> dict[str, Any]:
        self.described += 1
        return {"model": self.model, "dimension": self.dimension}

    async def _embed(self, text: str, query: bool = True) -> np.ndarray:
        self.embedded.append((text, query))
        await asyncio.sleep(0.05 if text.startswith("slow") else 0)  # answers out of order
        return np.full(self.dimension, float(len(text)), dtype=np.float32)

    async def _embed_many(self, texts: list[str]) -> np.ndarray:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.slice_delay_s)
            if self.fail_with:
                raise self.fail_with
            self.slices.append(len(texts))
            return np.array([np.full(self.dimension, float(len(t)), dtype=np.float32) for t in texts])
        finally:
            self.in_flight -= 1

    async def _count_tokens(self, texts: list[str]) -> int:
        self.counted.append(list(texts))
        return sum(len(t.split()) for t in texts)


class FakeVersion:
    """A pipeline version's handle: its Retriever serves `kbs` ({name: index version})."""

    def __init__(self, kbs: dict[str, int]) -> None:
        self.kbs = kbs
        self.knowledge_bases = FakeRemote(self._knowledge_bases)

    async def _knowledge_bases(self) -> dict[str, int]:
        return dict(self.kbs)


class Overload(Exception):
    """Stands in for Serve's BackPressureError."""


class FakeHandles:
    def __init__(self, **versions: tuple[str, dict[str, int]]) -> None:
        self.versions = {v: FakeVersion(kbs) for v, (_, kbs) in versions.items()}
        self.embedders = {v: FakeEmbedder(model) for v, (model, _) in versions.items()}

    async def get(self, version: str) -> FakeVersion:
        return self.versions[version]

    async def embedder(self, version: str) -> FakeEmbedder:
        return self.embedders[version]

    def prime(self, version: str, timeout_s: float) -> None:
        pass

    def is_overload(self, exc: BaseException) -> bool:
        return isinstance(exc, Overload)


def service(serving: list[str], hop_timeout_s: float = 30,
            **versions: tuple[str, dict[str, int]]) -> tuple[EmbeddingsService, FakeHandles]:
    handles = FakeHandles(**versions)
    return EmbeddingsService(handles, lambda: list(serving), hop_timeout_s), handles


def create(svc: EmbeddingsService, **body: Any) -> dict[str, Any]:
    return asyncio.run(svc.create(EmbeddingRequest(**body)))


def test_the_first_serving_version_whose_embedder_runs_the_model_answers() -> None:
    svc, handles = service(["v2", "v1", "v3"], v1=("bge-m3", {}), v2=("bge-small", {}), v3=("bge-m3", {}))
    response = create(svc, input="hello", model="bge-m3")
    assert response["model"] == "bge-m3"
    assert handles.embedders["v1"].embedded == [("hello", False)]
    assert handles.embedders["v2"].embedded == [] and handles.embedders["v3"].embedded == []


def test_a_knowledge_base_name_picks_the_first_version_whose_retriever_serves_it() -> None:
    svc, handles = service(["v2", "v1", "v3"], v1=("bge-m3", {"samples": 3}), v2=("bge-small", {"other": 1}),
                           v3=("bge-small", {"samples": 4}))
    response = create(svc, input="hello", model="samples")
    assert response["model"] == "samples"
    assert handles.embedders["v1"].embedded == [("hello", False)]
    assert handles.embedders["v2"].embedded == [] and handles.embedders["v3"].embedded == []


def test_an_embedding_model_name_wins_over_a_knowledge_base_of_that_name() -> None:
    svc, handles = service(["v1", "v2"], v1=("bge-small", {"bge-m3": 1}), v2=("bge-m3", {}))
    create(svc, input="hello", model="bge-m3")
    assert handles.embedders["v2"].embedded == [("hello", False)] and handles.embedders["v1"].embedded == []


def test_an_unknown_model_is_a_knowledge_base_not_found() -> None:
    svc, handles = service(["v1"], v1=("bge-m3", {"samples": 1}))
    with pytest.raises(KnowledgeBaseNotFoundError, match="unknown model 'nope'"):
        create(svc, input="hello", model="nope")
    assert handles.embedders["v1"].embedded == []


def test_with_no_version_serving_the_request_is_refused_as_unavailable() -> None:
    svc, handles = service([], v1=("bge-m3", {"samples": 1}))
    with pytest.raises(ServiceUnavailableError, match="no pipeline version is serving"):
        create(svc, input="hello", model="bge-m3")
    assert handles.embedders["v1"].described == 0


def test_dimensions_other_than_the_embedders_are_refused_before_embedding() -> None:
    svc, handles = service(["v1"], v1=("bge-m3", {}))
    with pytest.raises(InvalidRequestError, match="gives 3 dimensions, not 4"):
        create(svc, input="hello", model="bge-m3", dimensions=4)
    assert handles.embedders["v1"].embedded == [] and handles.embedders["v1"].counted == []
    assert len(create(svc, input="hello", model="bge-m3", dimensions=3)["data"][0]["embedding"]) == 3


def test_each_text_is_its_own_document_embedding_and_tokens_are_counted_once_for_all() -> None:
    svc, handles = service(["v1"], v1=("bge-m3", {}))
    response = create(svc, input=["slow one two", "three", "four five"], model="bge-m3")
    embedder = handles.embedders["v1"]
    assert embedder.embedded == [("slow one two", False), ("three", False), ("four five", False)]
    assert embedder.counted == [["slow one two", "three", "four five"]]
    assert response["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
    # in the input's order although the first text answered last
    assert [(d["index"], d["embedding"][0]) for d in response["data"]] == [(0, 12.0), (1, 5.0), (2, 9.0)]
    assert response["object"] == "list" and all(d["object"] == "embedding" for d in response["data"])


def test_a_single_string_is_one_text() -> None:
    svc, handles = service(["v1"], v1=("bge-m3", {}))
    response = create(svc, input="just one", model="bge-m3")
    assert handles.embedders["v1"].counted == [["just one"]] and len(response["data"]) == 1


def test_base64_is_the_little_endian_float32_bytes() -> None:
    svc, _ = service(["v1"], v1=("bge-m3", {}))
    response = create(svc, input="abcd", model="bge-m3", encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(response["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == [4.0, 4.0, 4.0]


def test_describe_is_asked_once_per_version() -> None:
    svc, handles = service(["v2", "v1"], v1=("bge-m3", {"samples": 1}), v2=("bge-small", {}))
    for _ in range(3):
        create(svc, input="hello", model="samples")
        create(svc, input="hello", model="bge-m3")
    assert handles.embedders["v1"].described == 1 and handles.embedders["v2"].described == 1
    assert len(handles.embedders["v1"].embedded) == 6


def test_many_texts_go_one_slice_at_a_time_in_order_and_the_documented_limit_succeeds() -> None:
    svc, handles = service(["v1"], v1=("bge-m3", {}))
    embedder = handles.embedders["v1"]
    embedder.slice_delay_s = 0.001
    texts = [f"text number {i}" + "x" * (i % 7) for i in range(EMBEDDING_INPUTS)]
    response = create(svc, input=texts, model="bge-m3")
    assert embedder.embedded == []  # none through the query batcher
    assert embedder.slices == [SLICE] * (EMBEDDING_INPUTS // SLICE) and embedder.most_in_flight == 1
    assert [d["embedding"][0] for d in response["data"]] == [float(len(t)) for t in texts]
    assert [d["index"] for d in response["data"]] == list(range(EMBEDDING_INPUTS))
    assert embedder.counted == [texts]


def test_a_list_just_over_a_few_is_sliced_and_the_last_slice_is_short() -> None:
    svc, handles = service(["v1"], v1=("bge-m3", {}))
    create(svc, input=[f"t{i}" for i in range(SLICE + FEW + 1)], model="bge-m3")
    assert handles.embedders["v1"].slices == [SLICE, FEW + 1]
    create(svc, input=[f"t{i}" for i in range(FEW)], model="bge-m3")
    assert handles.embedders["v1"].slices == [SLICE, FEW + 1] and len(handles.embedders["v1"].embedded) == FEW


def test_each_slice_has_its_own_deadline_not_the_whole_request() -> None:
    svc, handles = service(["v1"], hop_timeout_s=0.2, v1=("bge-m3", {}))
    embedder = handles.embedders["v1"]
    embedder.slice_delay_s = 0.1  # 4 slices take 0.4 s in all, each well inside 0.2 s
    assert len(create(svc, input=[f"t{i}" for i in range(4 * SLICE)], model="bge-m3")["data"]) == 4 * SLICE
    embedder.slice_delay_s = 0.5
    with pytest.raises(UpstreamTimeoutError, match=r"Embedder took longer than 0\.2s"):
        create(svc, input=[f"t{i}" for i in range(2 * SLICE)], model="bge-m3")


def test_a_full_embedder_queue_is_a_503_to_retry_and_other_failures_pass_through() -> None:
    svc, handles = service(["v1"], v1=("bge-m3", {}))
    handles.embedders["v1"].fail_with = Overload()
    with pytest.raises(OverloadedError, match="at capacity"):
        create(svc, input=[f"t{i}" for i in range(2 * SLICE)], model="bge-m3")
    handles.embedders["v1"].fail_with = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        create(svc, input=[f"t{i}" for i in range(2 * SLICE)], model="bge-m3")


def test_a_version_redeployed_with_another_model_is_described_again_after_a_while() -> None:
    now = [0.0]
    handles = FakeHandles(v2=("bge-m3", {}))
    svc = EmbeddingsService(handles, lambda: ["v2"], clock=lambda: now[0])
    assert create(svc, input="hello", model="bge-m3")["model"] == "bge-m3"
    handles.embedders["v2"].model = "bge-small"  # v2 rolled back, then redeployed with another model
    now[0] += TRUSTED_S / 2
    create(svc, input="hello", model="bge-m3")  # still trusted for a moment
    now[0] += TRUSTED_S
    with pytest.raises(KnowledgeBaseNotFoundError):
        create(svc, input="hello", model="bge-m3")
    assert create(svc, input="hello", model="bge-small")["model"] == "bge-small"
    assert handles.embedders["v2"].described == 2


def test_chatchats_embed_texts_answers_an_unserved_model_with_the_served_one_and_can_ask_as_queries() -> None:
    svc, handles = service(["v2", "v1"], v1=("bge-m3", {}), v2=("minilm", {"docs": 1}))
    vectors, model, note = asyncio.run(svc.chatchat_vectors(["ab", "abc"], "bge-large-zh-v1.5", False))
    assert model == "minilm" and vectors == [[2.0] * 3, [3.0] * 3] and "'bge-large-zh-v1.5' is not run here" in note
    assert handles.embedders["v2"].embedded == [("ab", False), ("abc", False)]
    vectors, model, note = asyncio.run(svc.chatchat_vectors(["q"] * (FEW + 2), "bge-m3", True))
    assert model == "bge-m3" and note is None and len(vectors) == FEW + 2
    assert handles.embedders["v1"].embedded == [("q", True)] * (FEW + 2)  # each with the query instruction
    many = [f"text {i}" for i in range(SLICE + 1)]
    vectors, _, _ = asyncio.run(svc.chatchat_vectors(many, None, False))
    assert len(vectors) == SLICE + 1 and handles.embedders["v2"].slices == [SLICE, 1]
