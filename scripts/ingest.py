"""Build a knowledge-base index version from a folder of files.

    python -m scripts.ingest --kb samples --source data/sample_kb

Chunking and the embedding model come from the pipeline version in serve_config.yaml, so the index
matches what serves it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from control.document import load_serve_config
from control.serve_config import GATEWAY_BUILDER, is_app, pipeline_configs
from rag.config import ConfigError, GatewayConfig, PipelineConfig, check_kb_name, validate
from rag.constants import resolve_path
from rag.documents import DEFAULT_MAX_FILE_BYTES
from rag.errors import RagError
from rag.ingest import IngestResult, ingest_directory
from rag.kb_versions import version_directory
from rag.leases import prune_versions

_MIB = 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kb", required=True, help="knowledge base name")
    parser.add_argument("--source", required=True, type=Path, help="folder of documents")
    parser.add_argument("--config", default="serve_config.yaml", help="Serve config to take settings from")
    parser.add_argument("--version", default=None, help="pipeline version whose settings to use (default: first)")
    parser.add_argument("--kb-root", type=Path, default=None, help="override retrieval.kb_root")
    parser.add_argument("--force", action="store_true", help="embed everything again and publish a new version")
    parser.add_argument("--set", dest="settings", action="append", type=setting, default=[],
                        help="override a pipeline setting (dotted key=value), e.g. to rebuild with the model of a "
                             "version about to be rolled out: --set embedding.model=models/bge-small-zh-v1.5")
    parser.add_argument("--max-file-mib", type=float, default=DEFAULT_MAX_FILE_BYTES / _MIB,
                        help="refuse any document larger than this (default: %(default)g)")
    return parser.parse_args(argv)


class ProgressBars:
    """tqdm bars for the library's (stage, done, total) progress callback."""

    def __init__(self) -> None:
        self._bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in ("load", "embed"):  # "published": the summary line says which version
            return
        bar = self._bars.get(stage) or self._bars.setdefault(stage, tqdm(total=total, desc=stage, unit="item"))
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        """End any bar left open by a failure, so the error starts on a line of its own."""
        for bar in self._bars.values():
            bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bars = ProgressBars()
    try:
        check_kb_name(args.kb)  # before reading any config or document
        if not (math.isfinite(args.max_file_mib) and args.max_file_mib > 0):
            raise ConfigError(f"--max-file-mib must be a positive number, got {args.max_file_mib}")
        config = _pipeline_config(args.config, args.version, args.settings)
        kb_root = resolve_path(args.kb_root) if args.kb_root else config.retrieval.kb_root_path
        result = ingest_directory(resolve_path(args.source), kb_root, args.kb, config, force=args.force,
                                  progress=bars, max_file_bytes=int(args.max_file_mib * _MIB))
        # The same clean-up as the API's: the newest versions and those a replica still reads stay.
        pruned = prune_versions(kb_root, args.kb, _gateway_config(args.config).knowledge_base.keep_versions,
                                config.retrieval.lease_ttl_s)
    except (RagError, OSError) as exc:
        bars.close()
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    _report(result, kb_root)
    if pruned:
        print(f"removed old index versions no replica reads: {', '.join(f'v{v}' for v in pruned)}")
    return 0


def _pipeline_config(path: str, version: str | None, settings: list[tuple[str, object]]) -> PipelineConfig:
    versions = pipeline_configs(load_serve_config(path))
    if not versions:
        raise ConfigError(f"{path} deploys no pipeline version")
    if version and version not in versions:
        raise ConfigError(f"no pipeline version {version!r} in {path}; there are {sorted(versions)}")
    config = versions[version] if version else next(iter(versions.values()))
    if not settings:
        return config
    args = config.model_dump(mode="json")
    for key, value in settings:
        set_dotted(args, key, value)
    return validate(PipelineConfig, args, "the pipeline settings with --set")


def setting(text: str) -> tuple[str, object]:
    """`--set KEY=VALUE`: a dotted key and a YAML value (as `rollout start --set` takes them)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def set_dotted(target: dict[str, Any], dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        target = target.setdefault(key, {})
    target[last] = value


def _gateway_config(path: str) -> GatewayConfig:
    apps = [a for a in load_serve_config(path)["applications"] if is_app(a, GATEWAY_BUILDER)]
    return validate(GatewayConfig, apps[0].get("args"), "gateway args") if apps else GatewayConfig()


def one_line(message: str) -> str:
    """A multi-line message (a config error lists each bad key) as one line, for scripts that grep stderr."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _report(result: IngestResult, kb_root: Path) -> None:
    m = result.manifest
    if result.stale_staging_removed:
        print(f"removed {result.stale_staging_removed} staging folder(s) left by killed ingests")
    state = "published" if result.created else "unchanged, kept"
    print(f"{state} {m.knowledge_base} v{m.version}: {m.count} chunks from {len(m.sources)} files "
          f"({m.embedding_model}, dim {m.dimension}) at {version_directory(kb_root, m.knowledge_base, m.version)}")
    if result.created:
        print(f"embedded {result.embedded} chunks, kept the vectors of {result.reused} unchanged ones")


if __name__ == "__main__":
    sys.exit(main())
