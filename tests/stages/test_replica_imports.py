"""A replica loads what its own work needs: every replica pays each import again when it starts (a cold
start from zero, a rollout, a crash replaced), and keeps it in memory."""

from __future__ import annotations

import pytest

from tests.support.imports import loaded_by

# The document parsers and splitters, the index, the model runtimes.
HEAVY = ["rag.documents", "rag.kb_build", "pypdf", "docx", "langchain_text_splitters", "rag.retrieval", "rag.index",
         "rag.lexical", "faiss", "scipy", "rag.embedding_runtime", "onnxruntime", "openvino", "torch", "transformers",
         "sentence_transformers"]


@pytest.mark.parametrize("module", [
    # It reaches its stages through handles.
    "deployments.stages.pipeline_deployment",
    # It checks uploaded files' names and reads manifests (rag.kb_store, rag.kb_versions); the
    # KnowledgeBases manager parses and builds, the Retrievers search.
    "deployments.gateway.gateway_deployment",
])
def test_an_adapter_that_only_routes_loads_no_parser_index_or_model(module: str) -> None:
    assert loaded_by(module, HEAVY) == []
