"""CPU runtimes for an exported sentence model (rag.embedding_export): OpenVINO or ONNX Runtime.

Measured on the 2-core demo machine (a CPU with AMX), MiniLM (`make bench-embedding`, README "Embedding
runtime"): a question takes 4.3 ms on OpenVINO, 4.4 ms on ONNX Runtime and 14 ms on PyTorch; ingest on one
thread embeds 95, 25 and 25 chunks/s. OpenVINO's default precision there is bf16 (AMX), whose vectors keep
a cosine of 0.99997 or more to PyTorch's float32 ones, so an index built by either serves the other. Where
the CPU lacks bf16 it computes in float32.

An encoder holds one compiled graph with its own threads: the Embedder keeps one for questions (one
thread, one batch at a time: latency) and one for ingest (batches sorted by length, as many at once as it
has threads, one thread each: throughput), so a question never waits behind an ingest batch. Batches
side by side beat one batch on several threads, the more so on a busy machine, where threads that wait
for each other lose their turn: 149 against 112 chunks/s on the two idle cores, 50 against 30 beside
three busy processes (MiniLM, bf16).

OpenVINO keeps the compiled graph in the export's directory (`openvino_cache/`, keyed by graph, precision
and OpenVINO version; the two lanes share it, as threads and streams are set at load) and later replicas
on the node load it instead of compiling: an Embedder's load takes 0.5 s of CPU instead of 1.1 at every
start, a cold start from zero included. Compiling happens under the export's file lock, so a replica never
reads a blob another is still writing; an unreadable or stale blob is compiled anew (OpenVINO's own
fallback, tested).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from rag.embedding_export import Export, Quantization, export_lock

GraphRuntime = Literal["openvino", "onnx"]
Precision = Literal["auto", "fp32"]
Feeds = dict[str, np.ndarray]
RunBatches = Callable[[list[Feeds]], list[np.ndarray]]


class GraphEncoder:
    """Texts to unit vectors through one compiled graph; safe to call from several threads (one at a time)."""

    def __init__(self, export: Export, runtime: GraphRuntime, quantization: Quantization, precision: Precision,
                 threads: int, parallel: bool = False) -> None:
        """`parallel`: run up to `threads` batches at once, one thread each (ingest), rather than one batch
        on `threads` threads (questions)."""
        from tokenizers import Tokenizer

        self.export = export
        self.threads = threads
        self._tokenizer = Tokenizer.from_file(str(export.tokenizer))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=export.max_seq_length)
        path = str(export.graph(quantization))
        streams = threads if parallel else 1
        if runtime == "openvino":
            opened = _open_openvino(path, precision, threads, streams, export)
        else:
            opened = _open_onnx(path, threads, streams)
        self._run, self.precision = opened
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """An (n, dimension) float32 array of normalized vectors, in the order of `texts`; texts of like
        length are batched together so a batch carries little padding."""
        encodings = self._tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids), reverse=True)
        out = np.empty((len(texts), self.export.dimension), dtype=np.float32)
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        feeds = [self._feeds([encodings[i] for i in rows]) for rows in batches]
        with self._lock:
            results = self._run(feeds)
        for rows, vectors in zip(batches, results, strict=True):
            out[rows] = vectors
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


def _open_openvino(path: str, precision: Precision, threads: int, streams: int,
                   export: Export) -> tuple[RunBatches, str]:
    global _core
    import openvino as ov

    if _core is None:
        _core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": streams,
                              "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT"}
    if precision == "fp32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    cache = export.directory / "openvino_cache"
    if os.access(export.directory, os.W_OK):  # a read-only export (a shared image) compiles every time
        config["CACHE_DIR"] = str(cache)
        with export_lock(export):
            compiled = _core.compile_model(path, "CPU", config)
    else:
        compiled = _core.compile_model(path, "CPU", config)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    computed = {"bf16": "bf16", "f16": "fp16"}.get(hint.to_string(), "fp32")
    if streams == 1:
        request = compiled.create_infer_request()
        # The request reuses its output buffer: each result is copied before the next call overwrites it.
        return (lambda batches: [np.array(request.infer(feeds)[0], dtype=np.float32, copy=True)
                                 for feeds in batches]), computed
    queue = ov.AsyncInferQueue(compiled, streams)

    def run_parallel(batches: list[Feeds]) -> list[np.ndarray]:
        results: list[np.ndarray] = [np.empty(0, np.float32)] * len(batches)

        def done(request: Any, index: int) -> None:
            results[index] = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        queue.set_callback(done)
        for index, feeds in enumerate(batches):
            queue.start_async(feeds, index)
        queue.wait_all()
        return results

    return run_parallel, computed


def _open_onnx(path: str, threads: int, streams: int) -> tuple[RunBatches, str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads // streams
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    computed = "int8" if path.endswith(".int8.onnx") else "fp32"

    def run(feeds: Feeds) -> np.ndarray:
        return np.asarray(session.run(None, feeds)[0], dtype=np.float32)

    if streams == 1:
        return (lambda batches: [run(feeds) for feeds in batches]), computed
    pool = ThreadPoolExecutor(streams, thread_name_prefix="embed")  # a session runs calls in parallel

    return (lambda batches: list(pool.map(run, batches))), computed
