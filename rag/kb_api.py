"""Request and response shapes of the knowledge-base API, as Langchain-Chatchat 0.3 names them.

Bodies are `{code, msg, data}` like Chatchat's, but the HTTP status is the real one: `code` repeats it,
and an error is never a 200 that carries an error code.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from rag.api import Flag, JsonNumber, Name, _Request
from rag.config import KB_NAME_PATTERN, VERSION_PATTERN
from rag.golden import MAX_ITEMS, MEASURES, GoldenItem

GoldenMeasure = Literal["recall@1", "recall@3", "recall@5", "mrr", "citation_rate", "words_rate"]

FileName = Annotated[str, Field(min_length=1, max_length=1024)]  # nested names (the CLI's folders) included
# Every body these routes allow fits their body limit (FILE_LIST_BODY_BYTES, 1,000 names of 1,024
# characters, each up to 12 bytes as JSON escapes): a schema-valid request is never a 413.
FileNames = Annotated[list[FileName], Field(min_length=1, max_length=1000)]
FILE_LIST_BODY_BYTES = 16 * 1024 * 1024
# The pattern every stored knowledge base's name has, stated in the schema so that a client (or a fuzzer)
# knows before it asks; names on the question routes stay free-form (an unknown one is a 404 there).
KbName = Annotated[str, Field(min_length=1, max_length=63, pattern=KB_NAME_PATTERN)]


class CreateKnowledgeBase(_Request):
    knowledge_base_name: KbName
    kb_info: Annotated[str, Field(max_length=4000)] = ""
    vector_store_type: Name | None = Field(None, description="accepted for Chatchat clients; always faiss here")
    embed_model: Name | None = Field(None, description="default: the serving version's embedding model")


class KnowledgeBaseRef(_Request):
    knowledge_base_name: KbName


class UpdateInfo(_Request):
    knowledge_base_name: KbName
    kb_info: Annotated[str, Field(max_length=4000)]


class EvalSet(_Request):
    """A knowledge base's golden set, replaced whole: each item a question, the file(s) that answer it and,
    optionally, words the answer should contain (see `rag.golden`)."""

    knowledge_base_name: KbName
    items: list[GoldenItem] = Field(max_length=MAX_ITEMS, description="[] removes the set")


class EvalResults(_Request):
    """A version's golden-set scores on a knowledge base, as `scripts.evaluate` computed them: kept as the
    `rag_golden_score` gauge for Prometheus."""

    # Checked like a KB's and a version's own names (the route checks the KB's): they become metric labels.
    knowledge_base_name: KbName
    version: Annotated[str, Field(pattern=VERSION_PATTERN)]
    scores: dict[GoldenMeasure, Annotated[float, Field(ge=0, le=1, strict=True)] | None] = Field(
        max_length=len(MEASURES))


class DeleteDocs(_Request):
    knowledge_base_name: KbName
    file_names: FileNames
    delete_content: Flag = Field(False, description="also delete the stored originals")
    wait: Flag = Field(True, description="answer once the new index version serves; false: a job id at once")


class UpdateDocs(_Request):
    knowledge_base_name: KbName
    file_names: FileNames
    chunk_size: Annotated[ChunkSize, JsonNumber] | None = None  # JSON here; a form's text in UploadForm
    chunk_overlap: Annotated[ChunkOverlap, JsonNumber] | None = None
    wait: Flag = True


ChunkSize = Annotated[int, Field(ge=50, le=20_000)]
ChunkOverlap = Annotated[int, Field(ge=0, le=19_999, description="one not smaller than chunk_size is lowered to "
                                                                  "half of chunk_size")]


class SplitterForm(_Request):
    """An upload form's splitter fields (a form's text: `"750"`), what `splitter()` hands the manager."""

    chunk_size: ChunkSize | None = None
    chunk_overlap: ChunkOverlap | None = None

    def splitter(self) -> dict[str, int] | None:
        chosen = {k: v for k, v in (("chunk_size", self.chunk_size), ("chunk_overlap", self.chunk_overlap))
                  if v is not None}
        return chosen or None


class UploadForm(SplitterForm):
    """The form fields of `upload_docs` besides its files."""

    knowledge_base_name: KbName
    override: bool = False
    wait: bool = True


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    kinds = [k for k in schema.get("anyOf", []) if k.get("type") != "null"]
    return {**{k: v for k, v in schema.items() if k not in ("anyOf", "default")}, **(kinds[0] if kinds else {})}


def form_body(form: type[BaseModel], required: list[str] | None = None) -> dict[str, Any]:
    """What /openapi.json says an upload route takes: `files` and the form's fields (the route reads the
    form itself, see kb_routes)."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files", *(required or [])],
        "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
            # A form field is absent or a value, never null: optional fields are left out of `required`.
            **{k: _not_null(v) for k, v in form.model_json_schema()["properties"].items()}}}}}}}


def kb_body(data: Any = None, msg: str = "success", code: int = 200) -> dict[str, Any]:
    return {"code": code, "msg": msg, "data": data}
