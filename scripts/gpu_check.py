"""The GPU check: the rag pipeline in-process on CUDA, bf16, with a randomly initialised model of the
Qwen2.5-0.5B shape; time to first token and tokens/s at 1 and 8 concurrent streams, and device
memory before loading, loaded, and after `close()`.

    .venv/bin/python -m scripts.gpu_check [--device cuda] [--json out.json]

No weights are downloaded: the model is built from a config and saved to a temp dir, then loaded
through the same `generation.model` path users configure. Its tokenizer is a word-level one trained
on the sample knowledge base (so the vocabulary is smaller than Qwen's; the transformer body has the
real shape), which makes one streamed piece one token.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rag.config import EmbeddingConfig, GenerationConfig, PipelineConfig, RetrievalConfig
from rag.constants import resolve_path
from rag.documents import iter_files, load_file
from rag.ingest import ingest_directory
from rag.local_pipeline import LocalPipeline
from rag.records import AnswerDelta, AnswerEnd, Question

QWEN_05B_SHAPE = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                  "num_key_value_heads": 2, "max_position_embeddings": 32768, "tie_word_embeddings": True}
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def build_model(path: Path, tiny: bool) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    texts = [d.page_content for f in iter_files(resolve_path("data/sample_kb")) for d in load_file(f)]
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    shape = {**QWEN_05B_SHAPE, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2} if tiny else QWEN_05B_SHAPE
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=raw.get_vocab_size(), bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                         **shape))
    # Random weights would stop at a random </s>: suppress the specials so every stream runs to max tokens.
    # (Sampling, not greedy: greedy random weights repeat one token, which a text streamer never splits.)
    model.generation_config.suppress_tokens = [raw.token_to_id(t) for t in SPECIALS]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def memory(device: str) -> dict[str, float]:
    import torch

    if device != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"allocated_mib": torch.cuda.memory_allocated() / 2**20,
            "reserved_mib": torch.cuda.memory_reserved() / 2**20, "device_used_mib": (total - free) / 2**20}


async def one_stream(pipeline: LocalPipeline, question: str) -> tuple[float, float, int]:
    began = time.perf_counter()
    first = None
    finish = None
    async for event in pipeline.pipeline.answer(Question(question, "samples", temperature=1.0)):
        if isinstance(event, AnswerDelta):
            first = first or time.perf_counter() - began
        elif isinstance(event, AnswerEnd):
            finish = event.finish_reason
    # With </s> suppressed a stream ends only at max_new_tokens ("length"): exactly that many tokens,
    # which re-tokenizing the decoded text would not give back.
    if finish != "length":
        raise RuntimeError(f"a stream ended with {finish!r} before max_new_tokens; tokens/s would be wrong")
    return first or 0.0, time.perf_counter() - began, pipeline.config.generation.max_new_tokens


async def measure(pipeline: LocalPipeline, concurrency: int, rounds: int) -> dict[str, float]:
    ttfts, rates, totals = [], [], []
    for _ in range(rounds):
        began = time.perf_counter()
        results = await asyncio.gather(*(one_stream(pipeline, "How do I stop the service?")
                                         for _ in range(concurrency)))
        wall = time.perf_counter() - began
        ttfts += [r[0] for r in results]
        totals.append(sum(r[2] for r in results))
        rates.append(sum(r[2] for r in results) / wall)
    return {"concurrency": concurrency, "ttft_p50_s": statistics.median(ttfts), "ttft_max_s": max(ttfts),
            "tokens_per_s": statistics.median(rates), "tokens_per_round": statistics.median(totals)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, to check the script on a CPU")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    report: dict[str, object] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                                 "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", args.tiny)
        config = PipelineConfig(
            embedding=EmbeddingConfig(device=args.device),
            retrieval=RetrievalConfig(kb_root=Path(tmp) / "kb", device=args.device),
            generation=GenerationConfig(backend="transformers", model=str(model_dir), device=args.device,
                                        dtype="bfloat16" if args.device == "cuda" else "float32",
                                        max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0))
        ingest_directory(resolve_path("data/sample_kb"), Path(tmp) / "kb", "samples", config)
        gc.collect()
        report["memory_before_load"] = memory(args.device)
        pipeline = LocalPipeline(config)
        began = time.perf_counter()
        pipeline.load()
        asyncio.run(pipeline.warmup())
        report["load_and_warmup_s"] = time.perf_counter() - began
        report["memory_loaded"] = memory(args.device)
        report["streams"] = [asyncio.run(measure(pipeline, c, args.rounds)) for c in (1, 8)]
        report["memory_after_streams"] = memory(args.device)
        pipeline.close()
        del pipeline
        gc.collect()
        report["memory_after_close"] = memory(args.device)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
