"""Retrieval recall through the running service: upload a folder over the KB API, ask its questions with
`search_docs`, score recall@1/3/5 as `scripts/eval_retrieval.py` does (a hit when the question's file is
the source of one of the top-k passages).

    python -m scripts.eval_service --kb en_eval --docs /tmp/heldout --questions data/eval/manpages_questions.jsonl
    python -m scripts.eval_service --kb zh_eval --docs /tmp/heldout_zh --questions data/eval/manpages_zh_questions.jsonl

Against `make demo` by default (--url, the API key in var/api_key). The KB is created when missing and the
folder uploaded in batches of 50 files (files already stored are kept). Run it on two deployments (e.g.
two embedding runtimes, with two KB names) to compare what users get from each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rag.client import DEFAULT_KEY_FILE, client_key, gateway_client

CUTOFFS = (1, 3, 5)
BATCH_FILES = 50


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key-file", default=DEFAULT_KEY_FILE)
    parser.add_argument("--kb", required=True, help="knowledge base to create (if missing) and ask")
    parser.add_argument("--docs", type=Path, required=True, help="folder of documents to upload")
    parser.add_argument("--questions", type=Path, required=True, help="JSON lines of question and source")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def upload(http: Any, kb: str, docs: Path) -> None:
    listed = http.get("/knowledge_base/list_knowledge_bases").json()
    if kb not in {entry["kb_name"] for entry in listed["data"]}:
        http.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": kb}).raise_for_status()
    files = sorted(p for p in docs.iterdir() if p.is_file())
    for start in range(0, len(files), BATCH_FILES):
        part = [("files", (p.name, p.read_bytes())) for p in files[start:start + BATCH_FILES]]
        response = http.post("/knowledge_base/upload_docs", files=part, data={"knowledge_base_name": kb})
        response.raise_for_status()
        if response.status_code != 200:
            raise RuntimeError(f"upload did not finish within the gateway's wait: {response.json()}")
        print(f"uploaded {start + len(part)} of {len(files)} files", file=sys.stderr)


def recall(http: Any, kb: str, questions: list[dict[str, str]]) -> dict[str, float]:
    hits = dict.fromkeys(CUTOFFS, 0)
    for question in questions:
        response = http.post("/knowledge_base/search_docs", json={
            "query": question["question"], "knowledge_base_name": kb, "top_k": max(CUTOFFS), "score_threshold": 2})
        response.raise_for_status()
        sources = [doc["metadata"]["source"] for doc in response.json()]
        for k in CUTOFFS:
            hits[k] += question["source"] in sources[:k]
    return {f"R@{k}": hits[k] / len(questions) for k in CUTOFFS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    questions = [json.loads(line) for line in args.questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    with gateway_client(args.url, client_key(args.api_key_file), timeout=600) as http:
        upload(http, args.kb, args.docs)
        models = http.get("/v1/models").json()
        result = recall(http, args.kb, questions)
    print(f"{args.kb}: {len(questions)} questions, " + " / ".join(f"{k} {v:.3f}" for k, v in result.items()))
    if args.json:
        args.json.write_text(json.dumps({"kb": args.kb, "recall": result, "models": models}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
