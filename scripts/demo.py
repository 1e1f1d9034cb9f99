"""End to end on the embedded default: local Ray, sample knowledge base, offline models.

    make demo        (or: .venv/bin/python -m scripts.demo)

Idempotent: a running cluster is reused, a knowledge base that exists is left as it is (it may have
been changed over the API since), and a re-deploy of an unchanged config restarts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time

from control import cluster, local_cluster
from control.document import load_serve_config
from control.serve_config import pipeline_configs
from rag.auth import create_key_file
from rag.client import DEFAULT_KEY_FILE, client_key, gateway_client, stream_chat
from rag.config import PipelineConfig
from rag.constants import resolve_path
from rag.embedding_export import ensure_export
from rag.ingest import ingest_directory
from rag.kb_versions import list_versions
from scripts.ingest import ProgressBars

QUESTION = "How do I upgrade the service without dropping requests?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args(argv)

    print("1/4 Ray head", "started" if local_cluster.start_head() else "already running", f"({cluster.DASHBOARD})")
    configs = list(pipeline_configs(load_serve_config(args.config)).values())
    _prepare_embedding(configs)
    for config in configs:
        for kb in config.retrieval.knowledge_bases:
            root = config.retrieval.kb_root_path
            if list_versions(root, kb):  # built already, maybe changed over the API since: leave it be
                built = list_versions(root, kb)[-1]
                print(f"2/4 knowledge base {kb}: v{built} (kept)")
            else:
                result = ingest_directory(resolve_path("data/sample_kb"), root, kb, config, progress=ProgressBars())
                built = result.manifest.version
                print(f"2/4 knowledge base {kb}: v{built} (new, {result.manifest.count} chunks)")
            pinned, name = config.retrieval.knowledge_bases[kb], config.version
            if pinned not in ("latest", built):
                print(f"    version {name} serves index v{pinned} of {kb}; to serve v{built}, roll it out:\n"
                      f"    python -m scripts.rollout start {name}-kb{built} --from {name} "
                      f"--set retrieval.knowledge_bases.{kb}={built}")
    key_file = resolve_path(DEFAULT_KEY_FILE)
    if create_key_file(key_file):
        print(f"    created the gateway's API key in {key_file} (mode 0600; keep it out of git)")
    print("3/4 serve deploy", args.config)
    cluster.deploy(args.config)
    cluster.wait_ready(on_poll=lambda status, body: print(f"    /ready {status} {body.get('status')} "
                                                      f"{body.get('waiting_for', '')}", flush=True))
    print(f"4/4 asking: {args.question}\n")
    with gateway_client(cluster.GATEWAY, client_key(key_file), timeout=120) as client:
        answer = stream_chat(client, args.question, on_event=_print_piece)
    print("\n\nsources:")
    for i, doc in enumerate(answer.sources, 1):
        print(f"  [{i}] {doc['metadata']['source']} (score {doc['score']:.2f})")
    print(f"\nserved by version {answer.version}, finish_reason={answer.finish_reason}")
    print(f"\nRay dashboard: {cluster.DASHBOARD} (token auth is on: it asks for the cluster token, which "
          f"`.venv/bin/ray get-auth-token` prints)   OpenAI-compatible API: {cluster.GATEWAY}/v1")
    print(f"Every route but /health and /ready needs the API key in {DEFAULT_KEY_FILE}:\n"
          f"    export OPENAI_API_KEY=$(cat {DEFAULT_KEY_FILE})\n"
          f'    curl -H "Authorization: Bearer $OPENAI_API_KEY" {cluster.GATEWAY}/v1/models')
    print("Stop gracefully with: make stop")
    return 0 if answer.complete else 1


def _prepare_embedding(configs: list[PipelineConfig]) -> None:
    """The CPU runtimes' ONNX export, made here once rather than inside the replicas' warm-up."""
    done: set[tuple[object, ...]] = set()
    for config in configs:
        embedding = config.embedding
        key = (embedding.model, embedding.cache_dir, embedding.quantization)
        if embedding.runtime == "torch" or key in done:
            continue
        done.add(key)
        started = time.monotonic()
        made = ensure_export(embedding.model, embedding.cache_dir, embedding.quantization)
        print(f"    embedding {embedding.model}: ONNX export in {made.directory.relative_to(resolve_path('.'))} "
              f"({time.monotonic() - started:.1f} s)")


def _print_piece(answer: object, event: object) -> None:
    if isinstance(event, dict):
        for choice in event.get("choices", []):
            print(choice.get("delta", {}).get("content") or "", end="", flush=True)


if __name__ == "__main__":
    sys.exit(main())
