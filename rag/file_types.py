"""The file types the service indexes, by suffix. Apart from the parsers (`rag.documents`), so that what
only checks a file's name (the knowledge-base store, the gateway's upload routes) imports none of them."""

from __future__ import annotations

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".csv", ".json", ".jsonl"})
