"""Throughput and latency of the transformers backend at 1-64 concurrent streams, in-process and through Serve.

    .venv/bin/python -m scripts.bench_generation --tiny [--streams 1 8 32 64] [--device cpu|cuda] [--json PATH]
    .venv/bin/python -m scripts.bench_generation --backend openai --base-url URL   (scripts/bench_upstream.py)

The model has random weights: `--tiny` a 2-layer Llama, otherwise the Qwen2.5-0.5B shape (24 layers, hidden
896, vocabulary 151,936), built once under `var/models/` with a word-level tokenizer and its special tokens
suppressed, so every answer runs to `--new-tokens`. Each stream asks `--rounds` questions back to back (more
where a cell would produce fewer than `--min-tokens`), greedy, with a prompt of about `--prompt-tokens`
tokens. In-process is `TransformersGenerator` in this process; through Serve is the project's Generator
deployment, deployed beside whatever runs on the demo cluster (or on a private cluster of the demo's shape
when none runs) and called through its handle. Inter-token times spread each arrival over the tokens it
carried.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports torch or the hub libraries
os.environ.setdefault("OMP_NUM_THREADS", "1")  # what serve_config.yaml gives the replicas

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from control import cluster
from rag.config import GenerationConfig, PipelineConfig
from rag.generation import TransformersGenerator
from rag.records import GenerationChunk, GenerationRequest, Passage
from scripts import bench_upstream
from tests.support import cluster as support

REPO = Path(__file__).resolve().parent.parent
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"architecture": "llama", "vocab_size": 2_000, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4},
    "qwen2.5-0.5b": {"architecture": "qwen2", "vocab_size": 151_936, "hidden_size": 896,
                     "intermediate_size": 4_864, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "tie_word_embeddings": True, "rope_theta": 1_000_000.0},
}
APP = f"bench-generation-{os.getpid()}"  # runs side by side do not delete each other's app
Stream = Callable[[GenerationRequest], AsyncIterator[list[GenerationChunk]]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["transformers", "openai"], default="transformers",
                        help="openai: an upstream server straight and through the service (scripts/bench_upstream.py)")
    bench_upstream.add_arguments(parser)
    parser.add_argument("--streams", type=int, nargs="+", default=None,
                        help="concurrent streams (default 1 8 32 64; with --backend openai 1 8 32)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of the 0.5B shape")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="questions per stream, back to back")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every cell, interleaved; the median counts")
    parser.add_argument("--min-tokens", type=int, default=4096, help="tokens per cell at least (more rounds)")
    parser.add_argument("--compile-level", type=int, default=0, help="generation.compile_level (CUDA)")
    parser.add_argument("--stream-window-s", type=float, default=0.05,
                        help="generation.stream_batch_window_s, pieces gathered per message between replicas (the "
                        "value serve_config.gpu.yaml sets for the transformers backend)")
    parser.add_argument("--skip-serve", action="store_true", help="in-process only")
    parser.add_argument("--json", default=None, help="write the results to this path")
    return parser.parse_args(argv)


def build_model(path: Path, shape: str) -> Path:
    """A random causal LM of `shape` with a word-level tokenizer ("w5", "w6", ...), saved like a checkpoint."""
    if (path / "config.json").exists():
        return path
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    spec = dict(SHAPES[shape])
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), spec["vocab_size"])})
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False)
    config = AutoConfig.for_model(spec.pop("architecture"), **spec, max_position_embeddings=4096,
                                  bos_token_id=2, eos_token_id=3, pad_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.suppress_tokens = list(range(len(SPECIALS)))  # answers run to their limit
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16 if shape != "tiny" else torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def generation_config(args: argparse.Namespace, model: Path) -> GenerationConfig:
    return GenerationConfig(backend="transformers", model=str(model), device=args.device,
                            max_new_tokens=args.new_tokens, max_stream_seconds=600, temperature=0.0,
                            max_batch_streams=max(args.streams), compile_level=args.compile_level,
                            stream_batch_window_s=args.stream_window_s,
                            kv_cache_tokens=max(args.streams) * (args.prompt_tokens + args.new_tokens + 64))


def question(generator: TransformersGenerator, prompt_tokens: int, new_tokens: int) -> GenerationRequest:
    """A request whose rendered prompt has about `prompt_tokens` tokens (the template adds its own)."""
    words = prompt_tokens
    for _ in range(4):
        request = GenerationRequest(question="w10 w11 w12?", max_new_tokens=new_tokens, temperature=0.0,
                                    passages=[Passage(id=1, text=" ".join(f"w{20 + i % 900}" for i in range(words)),
                                                      source="bench.txt", score=1.0)])
        words += prompt_tokens - len(generator.encode_prompt(request))
    return request


async def one_stream(stream: Stream, request: GenerationRequest, rounds: int) -> dict[str, Any]:
    ttft, gaps, tokens = [], [], 0
    for _ in range(rounds):
        began = last = time.perf_counter()
        async for chunks in stream(request):
            now, pieces = time.perf_counter(), sum(1 for c in chunks if c.text)
            if pieces:
                if last == began:
                    ttft.append(now - began)
                else:
                    gaps += [(now - last) / pieces] * pieces
                last, tokens = now, tokens + pieces
            if chunks and chunks[-1].finish_reason not in (None, "length"):
                raise RuntimeError(f"the answer stopped early ({chunks[-1].finish_reason}): EOS was not suppressed")
    return {"ttft": ttft, "gaps": gaps, "tokens": tokens}


async def measure(stream: Stream, request: GenerationRequest, streams: int, rounds: int) -> dict[str, float]:
    began = time.perf_counter()
    results = await asyncio.gather(*(one_stream(stream, request, rounds) for _ in range(streams)))
    wall = time.perf_counter() - began
    ttft = [t for r in results for t in r["ttft"]]
    gaps = [g for r in results for g in r["gaps"]] or [0.0]
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "inter_token_p50_s": float(np.percentile(gaps, 50)), "inter_token_p99_s": float(np.percentile(gaps, 99))}


def cells(args: argparse.Namespace, stream: Stream, request: GenerationRequest, side: str) -> dict[str, Any]:
    """Every stream count `--repeat` times, the counts interleaved so that a slow spell of a shared
    machine touches them all alike; each count keeps its run of median throughput."""
    runs: dict[str, list[dict[str, float]]] = {str(n): [] for n in args.streams}
    for repeat in range(args.repeat):
        for streams in args.streams:
            result = asyncio.run(measure(stream, request, streams, rounds(args, streams)))
            runs[str(streams)].append(result)
            print(f"  {side:<10} {streams:>3} streams, run {repeat + 1}: {result['tokens_per_s']:,.0f} tokens/s",
                  file=sys.stderr)
    return {n: sorted(r, key=lambda x: x["tokens_per_s"])[len(r) // 2] for n, r in runs.items()}


def rounds(args: argparse.Namespace, streams: int) -> int:
    """Questions per stream: `--rounds`, or more where few streams would make a cell too short to time."""
    return max(args.rounds, math.ceil(args.min_tokens / (streams * args.new_tokens)))


def cuda_used() -> int | None:
    """Bytes in use on the GPU by every process (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def in_process(args: argparse.Namespace, model: Path) -> tuple[dict[str, Any], GenerationRequest]:
    generator = TransformersGenerator(generation_config(args, model))
    began = time.perf_counter()
    generator.load()
    timings = asyncio.run(generator.warmup())
    results: dict[str, Any] = {"ready_s": time.perf_counter() - began, **(timings or {})}
    request = question(generator, args.prompt_tokens, args.new_tokens)

    async def stream(r: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        async for chunk in generator.stream(r):
            yield [chunk]

    results.update(cells(args, stream, request, "in-process"))
    generator.close()
    results["cuda_used_after_close"] = cuda_used()
    return results, request


@contextlib.contextmanager
def serve_cluster() -> Iterator[None]:
    """The running demo cluster if there is one (the app goes beside the project), else a private one."""
    support.use_token_auth()  # before Ray is imported: it reads RAY_AUTH_MODE once, at import
    import ray

    if cluster.ray_running():
        ray.init(address="auto", log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()
    else:
        with support.private_cluster():
            yield


def through_serve(args: argparse.Namespace, model: Path, request: GenerationRequest) -> dict[str, Any]:
    from ray import serve

    from deployments.stages.generator_deployment import GeneratorDeployment

    config = PipelineConfig(version="bench", generation=generation_config(args, model))
    actor = {"num_cpus": 0.2, "num_gpus": 1 if args.device == "cuda" else 0,
             "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                          "TOKENIZERS_PARALLELISM": "false"}}}
    results: dict[str, Any] = {}
    with serve_cluster():
        before = cuda_used()
        began = time.perf_counter()
        app = GeneratorDeployment.options(max_ongoing_requests=max(args.streams) + 8, ray_actor_options=actor)
        handle = serve.run(app.bind(config), name=APP, route_prefix=None).options(stream=True)
        results["ready_s"] = time.perf_counter() - began
        try:
            def stream(r: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
                return handle.generate.remote(r)  # type: ignore[no-any-return]

            results.update(cells(args, stream, request, "serve"))
        finally:
            serve.delete(APP)
        time.sleep(2)  # the replica's process exits after its cleanup
        after = cuda_used()
        if before is not None and after is not None:
            results["cuda_used_before_mib"], results["cuda_used_after_stop_mib"] = before >> 20, after >> 20
    return results


def report(args: argparse.Namespace, local: dict[str, Any], served: dict[str, Any]) -> None:
    print(f"\nGeneration, {'tiny' if args.tiny else 'Qwen2.5-0.5B-shaped'} random model on {args.device}: "
          f"prompt ~{args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.rounds} questions per stream")
    print(f"ready: in-process {local['ready_s']:.1f} s (compile {local.get('compile_s', 0):.1f} s)"
          + (f", through Serve {served['ready_s']:.1f} s" if served else ""))
    print(f"{'side':<11}{'streams':>8} | {'tokens/s':>10} | {'TTFT p50':>9} {'p99':>9} | "
          f"{'inter-token p50':>15} {'p99':>9}")
    print("-" * 80)
    for name, side in (("in-process", local), ("serve", served)):
        for streams in args.streams:
            if r := side.get(str(streams)):
                print(f"{name:<11}{streams:>8} | {r['tokens_per_s']:>10,.0f} | {r['ttft_p50_s'] * 1e3:>7.1f}ms "
                      f"{r['ttft_p99_s'] * 1e3:>7.1f}ms | {r['inter_token_p50_s'] * 1e3:>13.2f}ms "
                      f"{r['inter_token_p99_s'] * 1e3:>7.2f}ms")
    for name, side in (("in-process", local), ("serve", served)):
        if "1" in side and "8" in side:
            print(f"{name}: 8 streams give {side['8']['tokens_per_s'] / side['1']['tokens_per_s']:.1f}x "
                  "the throughput of 1")
    for streams in args.streams:
        if str(streams) in served:
            share = served[str(streams)]["tokens_per_s"] / local[str(streams)]["tokens_per_s"]
            print(f"serve keeps {share:.0%} of in-process throughput at {streams} streams")
    if served.get("cuda_used_before_mib") is not None:
        print(f"GPU memory in use: {served['cuda_used_before_mib']} MiB before the replica, "
              f"{served['cuda_used_after_stop_mib']} MiB after it stopped")
    for goal, met in goals(args, local, served):
        print(f"goal {'met   ' if met else 'MISSED'} {goal}")


def goals(args: argparse.Namespace, local: dict[str, Any], served: dict[str, Any]) -> list[tuple[str, bool]]:
    """The targets of issue 10 that this run measured: CPU ones with --tiny, GPU ones on CUDA."""
    def rate(side: dict[str, Any], streams: int) -> float | None:
        return side[str(streams)]["tokens_per_s"] if str(streams) in side else None

    found: list[tuple[str, bool]] = []
    if args.device == "cpu" and args.tiny:
        if (one := rate(local, 1)) and (eight := rate(local, 8)):
            found.append(("in-process: 8 streams >= 4x the throughput of 1", eight >= 4 * one))
        if (eight := rate(local, 8)) and (served_eight := rate(served, 8)):
            found.append(("serve >= 70% of in-process throughput at 8 streams", served_eight >= 0.7 * eight))
    if args.device == "cuda" and not args.tiny:
        if (one := rate(served, 1)) is not None:
            found.append(("serve, 1 stream >= 300 tokens/s", one >= 300))
        if (many := rate(served, 64)) is not None:
            found.append(("serve, 64 streams >= 4,700 tokens/s", many >= 4_700))
        if "8" in served:
            found.append(("serve, 8 streams: TTFT p99 < 200 ms", served["8"]["ttft_p99_s"] < 0.2))
        if served.get("cuda_used_before_mib") is not None:
            found.append(("GPU memory within 256 MiB of its baseline after the replica stopped",
                          served["cuda_used_after_stop_mib"] - served["cuda_used_before_mib"] < 256))
    return found


def as_json(local: dict[str, Any], served: dict[str, Any]) -> dict[str, Any]:
    """`{"in_process": {"<streams>": cell}, "serve": {...}, "startup": {...}}`: each side holds only its
    cells, keyed by stream count; start-up times and GPU memory go under "startup"."""
    def split(side: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return ({k: v for k, v in side.items() if k.isdigit()}, {k: v for k, v in side.items() if not k.isdigit()})

    (local_cells, local_rest), (served_cells, served_rest) = split(local), split(served)
    return {"in_process": local_cells, "serve": served_cells,
            "startup": {"in_process": local_rest, "serve": served_rest}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend == "openai":
        args.streams = args.streams or [1, 8, 32]
        args.new_tokens = 64 if args.new_tokens == 128 else args.new_tokens
        return bench_upstream.run(args)
    args.streams = args.streams or [1, 8, 32, 64]
    if not args.skip_serve:
        support.use_token_auth()  # before anything imports Ray, which reads RAY_AUTH_MODE once, at import
    shape = "tiny" if args.tiny else "qwen2.5-0.5b"
    model = build_model(REPO / "var" / "models" / f"bench-{shape}", shape)
    local, request = in_process(args, model)
    served = {} if args.skip_serve else through_serve(args, model, request)
    report(args, local, served)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(as_json(local, served), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
