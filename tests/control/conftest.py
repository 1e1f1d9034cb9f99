"""The rollout tests' config: the repository's serve_config.yaml with fast rollout settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.document import ServeDocument
from tests.control.rollout_fakes import FAST, REPO


@pytest.fixture
def config(tmp_path: Path) -> Path:
    # v1 follows `samples: latest`, which a rollout pins to the index published now: give it one, so the
    # test does not depend on a var/kb left by `make demo`.
    (tmp_path / "kb" / "samples" / "v1").mkdir(parents=True)
    (tmp_path / "kb" / "samples" / "v1" / "manifest.json").write_text("{}")
    path = tmp_path / "serve_config.yaml"
    ServeDocument.load(REPO / "serve_config.yaml").variant(gateway_args={"rollout": FAST},
                                                           kb_root=tmp_path / "kb").save(path)
    return path
