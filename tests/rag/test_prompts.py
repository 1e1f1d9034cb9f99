from __future__ import annotations

from rag.prompts import DEFAULT_SYSTEM_PROMPT, build_messages, format_sources, render_plain
from rag.records import ChatTurn, GenerationRequest, Passage

PASSAGES = [
    Passage(id=7, text="Paris is the capital of France.", source="france.md", score=0.9),
    Passage(id=3, text="长城位于中国北方。", source="china.txt", score=0.8),
]


def test_sources_are_numbered_with_their_source() -> None:
    text = format_sources(PASSAGES)
    assert text.startswith("[1] (france.md) Paris is the capital of France.")
    assert "[2] (china.txt) 长城位于中国北方。" in text
    assert "[3]" not in text


def test_messages_have_system_history_then_sources_and_question() -> None:
    history = [ChatTurn("user", "Hi there"), ChatTurn("assistant", "Hello! Ask me anything.")]
    request = GenerationRequest(question="What is the capital of France?", passages=PASSAGES,
                                history=history)
    messages = build_messages(request)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == DEFAULT_SYSTEM_PROMPT
    assert "[1]" in messages[0]["content"]  # the citation style is explained
    assert messages[1]["content"] == "Hi there"
    assert messages[2]["content"] == "Hello! Ask me anything."
    last = messages[-1]["content"]
    assert "[1] (france.md) Paris is the capital of France." in last
    assert "[2] (china.txt)" in last
    assert last.rstrip().endswith("What is the capital of France?")


def test_custom_system_prompt_and_no_passages() -> None:
    messages = build_messages(GenerationRequest(question="Who?", passages=[]), system_prompt="Be brief.")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert "No relevant passages" in messages[-1]["content"]
    assert "Who?" in messages[-1]["content"]


def test_plain_rendering_ends_with_assistant_cue() -> None:
    messages = build_messages(GenerationRequest(question="Why?", passages=PASSAGES[:1],
                                                history=[ChatTurn("user", "Earlier")]))
    text = render_plain(messages)
    lines = text.split("\n")
    assert lines[0].startswith("System: ")
    assert "User: Earlier" in lines
    assert text.endswith("\nAssistant:")
    assert "Why?" in text
