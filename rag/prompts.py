"""Prompt construction for knowledge-base chat, shaped like Chatchat's kb_chat prompt.

The retrieved passages are numbered so the model can cite them as [1], [2], ... and the
client can map each citation back to the passage list it received in the answer's first event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rag.language import cjk_share, language_of
from rag.records import GenerationRequest, Passage

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant that answers questions about a knowledge base. "
    "Answer using only the numbered sources given with the question. "
    "Cite the sources you use with their numbers in square brackets, like [1] or [2][3]. "
    "If the sources do not contain the answer, say that you don't know; do not make up facts. "
    "Answer in the same language as the question."
)

NO_SOURCES_NOTE = "(No relevant passages were found in the knowledge base.)"


@dataclass(frozen=True)
class Template:
    """The words of a kb_chat prompt in one language (Chatchat keeps Chinese templates, as here)."""

    system: str
    sources: str
    question: str
    no_sources: str
    tell_nothing: str


ENGLISH = Template(DEFAULT_SYSTEM_PROMPT, "Sources", "Question", NO_SOURCES_NOTE,
                   "Tell the user the knowledge base has nothing on this.")
CHINESE = Template(
    "你是一个根据知识库回答问题的助手。只使用问题附带的编号资料作答，并用方括号标注所用资料的编号，"
    "例如 [1] 或 [2][3]。如果资料中没有答案，就说不知道，不要编造。用与问题相同的语言回答。",
    "已知信息", "问题", "（知识库中没有找到相关内容。）", "请告诉用户知识库中没有这方面的内容。")


def template_for(question: str) -> Template:
    """The Chinese template for a Chinese question, else the English one."""
    return CHINESE if language_of(cjk_share(question)) == "zh" else ENGLISH


def format_sources(passages: Sequence[Passage], empty: str = NO_SOURCES_NOTE) -> str:
    """The passages as numbered blocks: ``[1] (source) text``, separated by blank lines."""
    if not passages:
        return empty
    return "\n\n".join(f"[{i}] ({p.source}) {p.text.strip()}" for i, p in enumerate(passages, 1))


def build_messages(request: GenerationRequest, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages: the system instructions, the history turns, then sources plus question, in the
    question's language (`template_for`)."""
    words = template_for(request.question)
    messages = [{"role": "system", "content": system_prompt or words.system}]
    messages.extend({"role": turn.role, "content": turn.content} for turn in request.history)
    colon = "：" if words is CHINESE else ": "
    if request.passages:
        user = (f"{words.sources}{colon.strip()}\n{format_sources(request.passages)}\n\n"
                f"{words.question}{colon}{request.question}")
    else:
        # Said explicitly, so the model answers "I don't know" instead of improvising.
        user = (f"{words.sources}{colon}{words.no_sources} {words.tell_nothing}\n\n"
                f"{words.question}{colon}{request.question}")
    messages.append({"role": "user", "content": user})
    return messages


def render_plain(messages: Sequence[dict[str, str]]) -> str:
    """A plain-text prompt for tokenizers without a chat template, ending with ``Assistant:``."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    lines.append("Assistant:")
    return "\n".join(lines)
