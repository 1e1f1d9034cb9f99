"""CPU runtimes for an exported sentence model (rag.embedding_export): OpenVINO or ONNX Runtime.

Measured on the 2-core demo machine (a CPU with AMX), MiniLM, one thread (README, "Embedding runtime"):
a question takes 2.4 ms on OpenVINO, 3.6 ms on ONNX Runtime and 12 ms on PyTorch; ingest embeds 61, 16 and
19 chunks/s. OpenVINO's default precision there is bf16 (AMX), whose vectors keep a cosine of 0.99997 or
more to PyTorch's float32 ones, so an index built by either serves the other. Where the CPU lacks bf16
it computes in float32.

An encoder holds one compiled graph with its own thread count: the Embedder keeps one for questions
(a thread, small batches, latency) and one for ingest (every core, batches sorted by length, throughput),
so a question never waits behind an ingest batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from rag.embedding_export import Export, Quantization

GraphRuntime = Literal["openvino", "onnx"]
Precision = Literal["auto", "fp32"]
Feeds = dict[str, np.ndarray]


class GraphEncoder:
    """Texts to unit vectors through one compiled graph; safe to call from several threads (one at a time)."""

    def __init__(self, export: Export, runtime: GraphRuntime, quantization: Quantization, precision: Precision,
                 threads: int) -> None:
        from tokenizers import Tokenizer

        self.export = export
        self.threads = threads
        self._tokenizer = Tokenizer.from_file(str(export.directory / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=export.max_seq_length)
        path = str(export.graph(quantization))
        opened = _open_openvino(path, precision, threads) if runtime == "openvino" else _open_onnx(path, threads)
        self._run, self.precision = opened
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """An (n, dimension) float32 array of normalized vectors, in the order of `texts`; texts of like
        length are batched together so a batch carries little padding."""
        encodings = self._tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids), reverse=True)
        out = np.empty((len(texts), self.export.dimension), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            feeds = self._feeds([encodings[i] for i in rows])
            with self._lock:
                out[rows] = self._run(feeds)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.ascontiguousarray(out / np.maximum(norms, 1e-12), dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(encoding.ids) for encoding in self._tokenizer.encode_batch(texts))

    def _feeds(self, encodings: list[Any]) -> Feeds:
        width = max(len(encoding.ids) for encoding in encodings)
        ids = np.full((len(encodings), width), self.export.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = encoding.ids, 1, encoding.type_ids
        named = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: named[name] for name in self.export.inputs}


_core: Any = None


def _open_openvino(path: str, precision: Precision, threads: int) -> tuple[Callable[[Feeds], np.ndarray], str]:
    global _core
    import openvino as ov

    if _core is None:
        _core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision == "fp32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = _core.compile_model(path, "CPU", config)
    request = compiled.create_infer_request()

    def run(feeds: Feeds) -> np.ndarray:
        # The request reuses its output buffer: copied before the next call overwrites it.
        return np.array(request.infer(feeds)[0], dtype=np.float32, copy=True)

    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    return run, {"bf16": "bf16", "f16": "fp16"}.get(hint.to_string(), "fp32")


def _open_onnx(path: str, threads: int) -> tuple[Callable[[Feeds], np.ndarray], str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(feeds: Feeds) -> np.ndarray:
        return np.asarray(session.run(None, feeds)[0], dtype=np.float32)

    return run, "int8" if path.endswith(".int8.onnx") else "fp32"
