"""Device choice and device-memory release, shared by the model-holding stages."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal


def nvidia_device_files() -> bool:
    """Whether the machine shows an NVIDIA GPU without importing torch (which costs a CPU-only process about
    a second and 300 MB); a cheap first check, `cuda_available` is the answer."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pick_device(requested: Literal["auto", "cpu", "cuda"]) -> str:
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    return requested


def empty_device_cache() -> None:
    """Return cached CUDA blocks to the driver; a no-op without torch or CUDA."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_memory() -> dict[str, int]:
    """Allocated and reserved CUDA bytes (zeros without CUDA), for cleanup logs."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {"allocated": 0, "reserved": 0}
    return {"allocated": int(torch.cuda.memory_allocated()), "reserved": int(torch.cuda.memory_reserved())}
