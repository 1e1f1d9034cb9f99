"""Request and response shapes of the knowledge-base API, as Langchain-Chatchat 0.3 names them.

Bodies are `{code, msg, data}` like Chatchat's, but the HTTP status is the real one: `code` repeats it,
and an error is never a 200 that carries an error code.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from rag.api import Name, _Request

FileName = Annotated[str, Field(min_length=1, max_length=1024)]
FileNames = Annotated[list[FileName], Field(min_length=1, max_length=10_000)]


class CreateKnowledgeBase(_Request):
    knowledge_base_name: Name
    kb_info: Annotated[str, Field(max_length=4000)] = ""
    vector_store_type: Name | None = Field(None, description="accepted for Chatchat clients; always faiss here")
    embed_model: Name | None = Field(None, description="default: the serving version's embedding model")


class KnowledgeBaseRef(_Request):
    knowledge_base_name: Name


class DeleteDocs(_Request):
    knowledge_base_name: Name
    file_names: FileNames
    delete_content: bool = Field(False, description="also delete the stored originals")
    wait: bool = Field(True, description="answer once the new index version serves; false: a job id at once")


class UpdateDocs(_Request):
    knowledge_base_name: Name
    file_names: FileNames
    chunk_size: Annotated[int, Field(ge=50, le=20_000)] | None = None
    chunk_overlap: Annotated[int, Field(ge=0, le=19_999)] | None = None
    wait: bool = True


def kb_body(data: Any = None, msg: str = "success", code: int = 200) -> dict[str, Any]:
    return {"code": code, "msg": msg, "data": data}
