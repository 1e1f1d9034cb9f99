"""A replica loads what its own work needs: every replica pays each import again when it starts (a cold
start from zero, a rollout, a crash replaced), and keeps it in memory."""

from __future__ import annotations

import pytest

from tests.support.imports import loaded_by

# The document parsers and splitters, the index, the model runtimes.
HEAVY = ["rag.documents", "rag.kb_build", "pypdf", "docx", "langchain_text_splitters", "rag.retrieval", "faiss",
         "rag.embedding_runtime", "onnxruntime", "openvino", "torch", "transformers", "sentence_transformers"]


@pytest.mark.parametrize(("module", "needs"), [
    # It reaches its stages through handles: no index, no model, no parser.
    ("deployments.stages.pipeline_deployment", []),
    # It checks uploaded files' names and reads manifests (the index module); the KnowledgeBases
    # manager parses and builds.
    ("deployments.gateway.gateway_deployment", ["faiss"]),
])
def test_an_adapter_that_only_routes_loads_no_parser_index_or_model(module: str, needs: list[str]) -> None:
    assert loaded_by(module, HEAVY) == needs
