"""The `openai` backend's overhead: tokens/s and time to first token at 1, 8 and 32 streams, straight to the
upstream and through this service, side by side in one run.

    .venv/bin/python -m scripts.bench_generation --backend openai --base-url http://127.0.0.1:8001/v1 \\
        [--upstream-model NAME] [--streams 1 8 32] [--new-tokens 64] [--gateway http://127.0.0.1:8000]

The service must already answer from that upstream (`make demo`, then the README's rollout to the `openai`
backend): the run checks `/v1/models` and refuses otherwise. Both sides use the same OpenAI client and the
same prompt: the service's question over `samples`, and, straight to the upstream, the messages the
service builds for it (its system prompt and the passages `search_docs` finds). Cells alternate between
the sides (`--repeat` times) and the medians count, so a busy moment hurts both alike. Tokens are the
upstream's own `usage` counts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import httpx
import openai

from rag.client import client_key
from rag.prompts import build_messages
from rag.records import GenerationRequest, Passage

QUESTION = "Where is the Ray dashboard, and what does it show?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", help="--backend openai: the upstream's API root, e.g. http://127.0.0.1:8001/v1")
    parser.add_argument("--upstream-model", default=None, help="default: the model the service's versions name")
    parser.add_argument("--gateway", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key-file", default="var/api_key")


async def _stream(client: openai.AsyncOpenAI, model: str, messages: list[dict[str, str]], new_tokens: int,
                  extra: dict[str, Any]) -> tuple[float | None, int]:
    began = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(model=model, messages=messages, stream=True,  # type: ignore[arg-type]
                                                  max_tokens=new_tokens, **extra)
    async for chunk in stream:
        if first is None and any(c.delta and c.delta.content for c in chunk.choices):
            first = time.perf_counter() - began
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first, tokens


async def _cell(client: openai.AsyncOpenAI, model: str, messages: list[dict[str, str]], streams: int, rounds: int,
                new_tokens: int, extra: dict[str, Any]) -> dict[str, float]:
    async def one() -> list[tuple[float | None, int]]:
        return [await _stream(client, model, messages, new_tokens, extra) for _ in range(rounds)]

    began = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(one() for _ in range(streams))) for r in rs]
    wall = time.perf_counter() - began
    ttfts = sorted(t for t, _ in results if t is not None)
    return {"tokens_per_s": sum(n for _, n in results) / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], "answers": len(results)}


def _served_model(gateway: str, key: str) -> str:
    """The upstream model every live version answers with; a clear refusal when the service does not use
    the `openai` backend (the comparison would be with something else)."""
    models = httpx.get(f"{gateway}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=30).json()["data"]
    backends = {(v["backend"], v["model"]) for m in models for v in m.get("generation", {}).values()}
    if len(backends) != 1 or next(iter(backends))[0] != "openai":
        raise SystemExit(f"the service at {gateway} does not answer from one upstream model ({sorted(backends)}): "
                         "roll out a version with generation.backend=openai first (README, 'An LLM server you "
                         "already run')")
    return str(next(iter(backends))[1])


def _messages(gateway: str, key: str) -> list[dict[str, str]]:
    found = httpx.post(f"{gateway}/knowledge_base/search_docs", headers={"authorization": f"Bearer {key}"},
                       json={"knowledge_base_name": "samples", "query": QUESTION}, timeout=30).json()
    passages = [Passage(int(d["id"]), d["page_content"], d["metadata"]["source"], d["score"]) for d in found]
    return build_messages(GenerationRequest(question=QUESTION, passages=passages))


async def _run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    key = client_key(args.api_key_file)
    model = args.upstream_model or _served_model(args.gateway, key)
    messages = _messages(args.gateway, key)
    direct = openai.AsyncOpenAI(base_url=args.base_url, api_key="none", max_retries=0, timeout=300)
    served = openai.AsyncOpenAI(base_url=f"{args.gateway}/v1", api_key=key, max_retries=0, timeout=300)
    sides = {"upstream": (direct, model, messages, {"stream_options": {"include_usage": True}}),
             "service": (served, "samples", [{"role": "user", "content": QUESTION}], {})}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {side: {} for side in sides}
    for streams in args.streams:
        for _ in range(args.repeat):
            for side, (client, name, prompt, extra) in sides.items():
                cell = await _cell(client, name, prompt, streams, args.rounds, args.new_tokens, extra)
                runs[side].setdefault(str(streams), []).append(cell)
    return {side: {n: {k: statistics.median(c[k] for c in cells) for k in cells[0]} for n, cells in by_n.items()}
            for side, by_n in runs.items()}


def run(args: argparse.Namespace) -> int:
    if not args.base_url:
        raise SystemExit("--backend openai needs --base-url (the upstream's API root)")
    result = asyncio.run(_run(args))
    up, svc = result["upstream"], result["service"]
    print(f"\nUpstream {args.base_url} straight and through the service ({args.gateway}): {args.new_tokens} new "
          f"tokens, {args.rounds} questions per stream, median of {args.repeat}")
    print(f"{'streams':>8} | {'upstream tok/s':>14} {'service tok/s':>14} {'share':>6} | "
          f"{'TTFT p50 up':>11} {'service':>8} {'added':>8} | {'p99 up':>8} {'service':>8}")
    print("-" * 96)
    for n in map(str, args.streams):
        u, s = up[n], svc[n]
        print(f"{n:>8} | {u['tokens_per_s']:>14,.0f} {s['tokens_per_s']:>14,.0f} "
              f"{s['tokens_per_s'] / u['tokens_per_s']:>6.0%} | {u['ttft_p50_s'] * 1e3:>9.1f}ms "
              f"{s['ttft_p50_s'] * 1e3:>6.1f}ms {(s['ttft_p50_s'] - u['ttft_p50_s']) * 1e3:>+6.1f}ms | "
              f"{u['ttft_p99_s'] * 1e3:>6.1f}ms {s['ttft_p99_s'] * 1e3:>6.1f}ms")
    if "8" in up:
        share = svc["8"]["tokens_per_s"] / up["8"]["tokens_per_s"]
        print(f"goal {'met   ' if share >= 0.9 else 'MISSED'} the service keeps >= 90% of the upstream's tokens/s "
              f"at 8 streams ({share:.0%})")
        added = (svc["8"]["ttft_p50_s"] - up["8"]["ttft_p50_s"]) * 1e3
        print(f"goal {'met   ' if added <= 30 else 'MISSED'} TTFT p50 at most the upstream's + 30 ms at 8 streams "
              f"({added:+.1f} ms)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    sys.exit(run(parser.parse_args()))
