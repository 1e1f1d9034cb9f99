"""Chinese knowledge bases: language profiles, `retrieval.mode: auto`, Chinese prompts, and a path to
a Chinese embedding model (a tiny random sentence-transformers model built here, offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rag.config import EmbeddingConfig, PipelineConfig, RetrievalConfig
from rag.embedding import TextEmbedder
from rag.errors import IndexMismatchError
from rag.index import KnowledgeBaseIndex
from rag.ingest import ingest_directory
from rag.language import choose_mode, cjk_share, language_of
from rag.lexical import tokenize
from rag.prompts import build_messages
from rag.records import GenerationRequest, Passage
from rag.retrieval import Retriever

ZH_DOCS = {
    "tail.md": "# 查看文件末尾\n\n持续追踪一个不断增长的日志文件的末尾，可以使用跟随模式，新写入的行会立即显示。",
    "chsh.md": "# 更改登录外壳\n\n修改用户登录时使用的外壳程序。普通用户只能修改自己的外壳。",
    "passwd.md": "# 修改口令\n\n更改用户账户的口令。系统管理员可以修改任何用户的口令，并可以锁定账户。",
    "gzip.md": "# 压缩文件\n\n压缩文件以减小体积，压缩后的文件扩展名为 .gz，可以用解压命令还原。",
}
QUESTIONS = {"如何持续追踪一个不断增长的日志文件？": "tail.md", "怎样修改用户登录时用的外壳？": "chsh.md",
             "管理员如何锁定用户账户的口令？": "passwd.md", "如何减小文件体积？": "gzip.md"}


@pytest.fixture(scope="module")
def zh_root(tmp_path_factory: pytest.TempPathFactory, embedder: TextEmbedder) -> Path:
    source, root = tmp_path_factory.mktemp("zh_src"), tmp_path_factory.mktemp("zh_kb")
    for name, text in ZH_DOCS.items():
        (source / name).write_text(text, encoding="utf-8")
    ingest_directory(source, root, "zh", PipelineConfig(), embedder=embedder)
    return root


def test_language_profile_is_recorded_at_publish(zh_root: Path, sample_manifest) -> None:
    manifest = KnowledgeBaseIndex.load(zh_root, "zh").manifest
    assert manifest.main_language == "zh" and manifest.language["cjk_share"] > 0.8
    assert sample_manifest.main_language == "en"


@pytest.mark.parametrize(("text", "language"), [("如何修改口令？", "zh"), ("How do I change passwords?", "en"),
                                                ("用 tail -f 查看 nginx access.log 的末尾", "zh"),
                                                ("see 附录 for the full reference of every option", "en"),
                                                ("", "en")])
def test_detection_counts_cjk_against_other_letters(text: str, language: str) -> None:
    assert language_of(cjk_share(text)) == language


@pytest.mark.parametrize(("configured", "model", "kb", "query", "mode"), [
    ("auto", ["en"], "en", "en", "hybrid"),
    ("auto", ["en"], "zh", "zh", "lexical"),
    ("auto", ["en"], "en", "zh", "lexical"),  # a Chinese question on an English KB
    ("auto", ["zh", "en"], "zh", "zh", "hybrid"),  # a model that covers Chinese gets its vote back
    ("auto", ["en"], None, None, "hybrid"),  # an index from before language profiles
    ("dense", ["en"], "zh", "zh", "dense"),
    ("hybrid", ["en"], "zh", "zh", "hybrid"),
])
def test_auto_fuses_only_where_the_model_covers_the_text(configured, model, kb, query, mode) -> None:
    choice = choose_mode(configured, model, kb, query)
    assert choice.mode == mode and choice.why


def test_auto_lets_bm25_lead_on_chinese_with_the_english_model(zh_root: Path, embedder: TextEmbedder) -> None:
    auto = Retriever(RetrievalConfig(kb_root=zh_root, knowledge_bases={"zh": "latest"}), embedder.model_name)
    hybrid = Retriever(RetrievalConfig(kb_root=zh_root, knowledge_bases={"zh": "latest"}, mode="hybrid"),
                       embedder.model_name)
    auto.load()
    hybrid.load()
    try:
        for question, source in QUESTIONS.items():
            vector = embedder.embed_queries([question])
            found = auto.search("zh", vector, top_k=1, score_threshold=0.2, text=question)
            assert [p.source for p in found] == [source], question
        assert auto.describe()["zh"]["mode"] == "lexical" and "covers en" in auto.describe()["zh"]["why"]
        assert hybrid.describe()["zh"]["mode"] == "hybrid"
    finally:
        auto.close()
        hybrid.close()


def test_letter_spaced_chinese_is_rejoined_into_words() -> None:
    assert tokenize("修 改 用 户 的 口 令") == tokenize("修改用户的口令")
    assert "口令" in tokenize("修 改 用 户 的 口 令")


def test_prompt_follows_the_question_language() -> None:
    passages = [Passage(id=1, text="持续追踪日志。", source="tail.md", score=0.5)]
    chinese = build_messages(GenerationRequest(question="如何追踪日志？", passages=passages))
    english = build_messages(GenerationRequest(question="How do I follow a log?", passages=passages))
    assert "已知信息" in chinese[-1]["content"] and "问题：如何追踪日志？" in chinese[-1]["content"]
    assert "只使用" in chinese[0]["content"]
    assert english[-1]["content"].startswith("Sources:") and "Question: How" in english[-1]["content"]
    empty = build_messages(GenerationRequest(question="如何追踪日志？", passages=[]))
    assert "没有" in empty[-1]["content"]


@pytest.fixture(scope="module")
def chinese_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT with a character vocabulary, saved as a sentence-transformers model."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("bge-tiny-zh")
    chars = sorted({ch for text in [*ZH_DOCS.values(), *QUESTIONS, "为这个句子生成表示以用于检索相关文章："]
                    for ch in text if not ch.isspace()})
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]), encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), tokenize_chinese_chars=True)
    bert = BertModel(BertConfig(vocab_size=len(chars) + 5, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    (raw := path / "raw").mkdir()
    bert.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=128)
    model = SentenceTransformer(modules=[transformer, models.Pooling(32, pooling_mode="cls")], device="cpu")
    model.save(str(path / "model"))
    return path / "model"


def test_a_local_chinese_model_with_a_query_prefix_serves_its_own_index(tmp_path: Path, chinese_model: Path,
                                                                       zh_root: Path) -> None:
    prefix = "为这个句子生成表示以用于检索相关文章："
    # The CPU runtime exports the model once; a test model's export goes to its own temporary folder,
    # not the repository's var/models, where every run would leave one more.
    config = PipelineConfig(embedding=EmbeddingConfig(model=str(chinese_model), languages=["zh", "en"],
                                                      query_prefix=prefix, device="cpu",
                                                      cache_dir=tmp_path / "models"))
    embedder = TextEmbedder(config.embedding)
    embedder.load()
    try:
        question = next(iter(QUESTIONS))
        assert np.allclose(embedder.embed_queries([question]), embedder.embed([prefix + question]))
        assert not np.allclose(embedder.embed_queries([question]), embedder.embed([question]))
        source = tmp_path / "src"
        source.mkdir()
        for name, text in ZH_DOCS.items():
            (source / name).write_text(text, encoding="utf-8")
        manifest = ingest_directory(source, tmp_path / "kb", "zh", config, embedder=embedder).manifest
        assert manifest.embedding_model == str(chinese_model) and manifest.dimension == 32
        retriever = Retriever(RetrievalConfig(kb_root=tmp_path / "kb", knowledge_bases={"zh": "latest"}),
                              str(chinese_model), model_languages=config.embedding.languages)
        retriever.load()
        try:
            assert retriever.describe()["zh"]["mode"] == "hybrid"  # the model covers Chinese
            found = retriever.search("zh", embedder.embed_queries([question]), top_k=4, text=question)
            assert {p.source for p in found} <= set(ZH_DOCS) and found
        finally:
            retriever.close()
    finally:
        embedder.close()
    # An index built with the bundled model is refused by a version running the Chinese one, and back.
    with pytest.raises(IndexMismatchError, match="embedding model"):
        KnowledgeBaseIndex.load(zh_root, "zh", expected_model=str(chinese_model))
    with pytest.raises(IndexMismatchError):
        KnowledgeBaseIndex.load(tmp_path / "kb", "zh", expected_model=PipelineConfig().embedding.model)
