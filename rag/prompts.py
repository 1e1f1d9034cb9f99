"""Prompt construction for knowledge-base chat, shaped like Chatchat's kb_chat prompt.

The retrieved passages are numbered so the model can cite them as [1], [2], ... and the
client can map each citation back to the passage list it received in the answer's first event.
"""

from __future__ import annotations

from collections.abc import Sequence

from rag.records import GenerationRequest, Passage

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant that answers questions about a knowledge base. "
    "Answer using only the numbered sources given with the question. "
    "Cite the sources you use with their numbers in square brackets, like [1] or [2][3]. "
    "If the sources do not contain the answer, say that you don't know; do not make up facts. "
    "Answer in the same language as the question."
)

NO_SOURCES_NOTE = "(No relevant passages were found in the knowledge base.)"


def format_sources(passages: Sequence[Passage]) -> str:
    """The passages as numbered blocks: ``[1] (source) text``, separated by blank lines."""
    if not passages:
        return NO_SOURCES_NOTE
    return "\n\n".join(f"[{i}] ({p.source}) {p.text.strip()}" for i, p in enumerate(passages, 1))


def build_messages(request: GenerationRequest,
                   system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Chat messages: the system instructions, the history turns, then sources plus question."""
    messages = [{"role": "system", "content": system_prompt}]
    messages.extend({"role": turn.role, "content": turn.content} for turn in request.history)
    if request.passages:
        user = (f"Sources:\n{format_sources(request.passages)}\n\n"
                f"Question: {request.question}")
    else:
        # Said explicitly, so the model answers "I don't know" instead of improvising.
        user = (f"Sources: {NO_SOURCES_NOTE} Tell the user the knowledge base has nothing on this.\n\n"
                f"Question: {request.question}")
    messages.append({"role": "user", "content": user})
    return messages


def render_plain(messages: Sequence[dict[str, str]]) -> str:
    """A plain-text prompt for tokenizers without a chat template, ending with ``Assistant:``."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    lines.append("Assistant:")
    return "\n".join(lines)
