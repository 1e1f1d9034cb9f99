"""Score a running version on a knowledge base's golden set, through the gateway.

    python -m scripts.evaluate --kb samples                 # whichever version the gateway routes to
    python -m scripts.evaluate --kb samples --version v2    # one version, even at weight 0
    python -m scripts.evaluate --kb samples --json          # for machines

The golden set is the KB's `eval.jsonl` (read and replaced with GET / POST /knowledge_base/eval_set).
Prints recall@1/3/5, MRR, the share of answers that cite an expected file and, where items name words,
the share of answers that contain them. Exit status 1 when the KB has no golden set.
"""

from __future__ import annotations

import argparse
import json
import sys

from control import cluster
from control.evaluation import evaluate, fetch_items
from rag.client import client_key

COLUMNS = ("items", "errors", "recall@1", "recall@3", "recall@5", "mrr", "citation_rate", "words_rate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kb", required=True, help="the knowledge base whose golden set to run")
    parser.add_argument("--version", default=None, help="the version to evaluate (default: as routed)")
    parser.add_argument("--gateway", default=cluster.GATEWAY)
    parser.add_argument("--api-key-file", default="var/api_key")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    key = client_key(args.api_key_file)
    items = fetch_items(args.gateway, key, args.kb)
    if not items:
        print(f"knowledge base {args.kb!r} has no golden set: POST one to /knowledge_base/eval_set", file=sys.stderr)
        return 1
    result = evaluate(args.gateway, key, args.kb, items, args.version)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"golden set of {args.kb}: {len(items)} questions, version {args.version or '(as routed)'}")
    for column in COLUMNS:
        value = result.get(column)
        print(f"  {column:<14} {'-' if value is None else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
