"""Thin Ray Serve adapters over the `rag` library, one module per stage, plus the app builders."""
