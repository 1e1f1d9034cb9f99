"""Which language a text is in, as far as retrieval cares, and which retrieval a query gets for it.

Two scripts matter here: CJK (Chinese, and Japanese kanji) and everything else. An embedding model
declares the languages it covers (`embedding.languages`); the bundled MiniLM covers English only, so
its vectors for Chinese text are noise (measured: R@5 0.03 on Chinese man pages, where BM25 over
jieba words reaches 0.93). `retrieval.mode: auto` therefore fuses dense and lexical rankings only
where the model covers both the question's and the knowledge base's language, and otherwise lets the
lexical ranking lead, with the dense one only filling in after it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LETTER = re.compile(r"[^\W\d_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Chinese text carries Latin words (commands, flags, names): a page is Chinese well before half its
# letters are CJK, since one CJK character stands for a word that takes several Latin letters.
CJK_SHARE_FOR_ZH = 0.2

Mode = Literal["dense", "hybrid", "lexical"]


def cjk_share(texts: str | Iterable[str]) -> float:
    """CJK characters / (CJK characters + other letters); 0 for text without letters."""
    cjk = other = 0
    for text in [texts] if isinstance(texts, str) else texts:
        c = len(_CJK.findall(text))
        cjk += c
        other += len(_LETTER.findall(text))
    return cjk / (cjk + other) if cjk + other else 0.0


def language_of(share: float) -> str:
    return "zh" if share >= CJK_SHARE_FOR_ZH else "en"


@dataclass(frozen=True)
class Choice:
    mode: Mode
    why: str


def choose_mode(configured: Literal["auto", "dense", "hybrid"], model_languages: Iterable[str],
                kb_language: str | None, query_language: str | None = None) -> Choice:
    """The retrieval a query (or, without `query_language`, a knowledge base) gets.

    `dense` and `hybrid` are honoured as configured; `auto` is hybrid where the embedding model covers
    the knowledge base's and the question's language, and lexical-led where it does not."""
    if configured != "auto":
        return Choice(configured, f"retrieval.mode is {configured}")
    covered = set(model_languages)
    for what, language in (("the knowledge base", kb_language), ("the question", query_language)):
        if language is not None and language not in covered:
            return Choice("lexical", f"{what} is {language} and the embedding model covers "
                                     f"{', '.join(sorted(covered)) or 'no declared language'}")
    return Choice("hybrid", f"the embedding model covers {kb_language or 'the text'}")
