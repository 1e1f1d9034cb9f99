"""Build a knowledge-base index version from a folder of files.

    python -m scripts.ingest --kb samples --source data/sample_kb

Chunking and the embedding model come from the pipeline version in serve_config.yaml, so the index
matches what serves it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from rag.config import ConfigError, load_serve_config, pipeline_configs
from rag.constants import resolve_path
from rag.errors import RagError
from rag.ingest import ingest_directory


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kb", required=True, help="knowledge base name")
    parser.add_argument("--source", required=True, type=Path, help="folder of documents")
    parser.add_argument("--config", default="serve_config.yaml", help="Serve config to take settings from")
    parser.add_argument("--version", default=None, help="pipeline version whose settings to use (default: first)")
    parser.add_argument("--kb-root", type=Path, default=None, help="override retrieval.kb_root")
    parser.add_argument("--force", action="store_true", help="publish a new version even if nothing changed")
    return parser.parse_args(argv)


class ProgressBars:
    """tqdm bars for the library's (stage, done, total) progress callback."""

    def __init__(self) -> None:
        self._bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self._bars.get(stage) or self._bars.setdefault(stage, tqdm(total=total, desc=stage, unit="item"))
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        versions = pipeline_configs(load_serve_config(args.config))
        if not versions:
            raise ConfigError(f"{args.config} deploys no pipeline version")
        if args.version and args.version not in versions:
            raise ConfigError(f"no pipeline version {args.version!r} in {args.config}; there are {sorted(versions)}")
        config = versions[args.version] if args.version else next(iter(versions.values()))
        kb_root = resolve_path(args.kb_root) if args.kb_root else config.retrieval.kb_root_path
        result = ingest_directory(resolve_path(args.source), kb_root, args.kb, config, force=args.force,
                                  progress=ProgressBars())
    except (RagError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = result.manifest
    state = "published" if result.created else "unchanged, kept"
    print(f"{state} {m.knowledge_base} v{m.version}: {m.count} chunks from {len(m.sources)} files "
          f"({m.embedding_model}, dim {m.dimension}) at {kb_root / m.knowledge_base / f'v{m.version}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
