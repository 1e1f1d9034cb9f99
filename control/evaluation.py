"""Running a knowledge base's golden set against one version through the gateway: what
`scripts.evaluate` prints and what a rollout compares (candidate against stable).

Each question goes to `/v1/chat/completions` with the version named in `EVALUATE_HEADER`: the gateway
routes it to that version only (even one at weight 0), never copies it, and keeps it out of the users'
numbers in `/stats`. The questions ask for `EVAL_TOP_K` passages, so recall@5 is measured whatever the
version's own `top_k`.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from rag.constants import EVALUATE_HEADER
from rag.golden import EVAL_TOP_K, MEASURES, GoldenItem, ItemResult, check_items, item_result, score

logger = logging.getLogger("control.evaluation")
PARALLEL = 4  # questions in flight at once: a golden set must not crowd out the users


def fetch_items(gateway: str, api_key: str | None, kb: str, timeout_s: float = 30) -> list[GoldenItem]:
    """The KB's golden set over the KB API (empty when it has none)."""
    response = httpx.get(f"{gateway}/knowledge_base/eval_set", params={"knowledge_base_name": kb},
                         headers=_headers(api_key), timeout=timeout_s)
    if response.status_code != 200:
        raise RuntimeError(f"reading the golden set of {kb!r} answered {response.status_code}: {response.text[:300]}")
    return check_items(response.json()["data"]["items"])


def evaluate(gateway: str, api_key: str | None, kb: str, items: list[GoldenItem], version: str | None = None,
             timeout_s: float = 120) -> dict[str, Any]:
    """The golden set's scores for `version` (None: whichever version the gateway routes to)."""
    headers = {**_headers(api_key), **({EVALUATE_HEADER: version} if version else {})}
    with httpx.Client(base_url=gateway, headers=headers, timeout=timeout_s) as client, \
            ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda item: _ask(client, kb, item), items))
    scores = score(items, results)
    if version:
        _report(gateway, api_key, kb, version, scores)
    return {"knowledge_base": kb, "version": version, **scores}


def _report(gateway: str, api_key: str | None, kb: str, version: str, scores: dict[str, Any]) -> None:
    """Hand the scores to the gateway for Prometheus; the scores stand whether or not it takes them."""
    body = {"knowledge_base_name": kb, "version": version, "scores": {m: scores[m] for m in MEASURES}}
    try:
        httpx.post(f"{gateway}/knowledge_base/eval_results", json=body, headers=_headers(api_key), timeout=10)
    except httpx.HTTPError as exc:
        logger.warning("event=GOLDEN_REPORT_FAILED version=%s kb=%s error=%r", version, kb, exc)


def _ask(client: httpx.Client, kb: str, item: GoldenItem) -> ItemResult:
    body = {"model": kb, "stream": False, "top_k": EVAL_TOP_K, "messages": [{"role": "user", "content": item.question}]}
    try:
        response = client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return ItemResult(type(exc).__name__)
    if response.status_code != 200:
        return ItemResult(str(response.status_code))
    answer = response.json()
    return item_result("ok", answer.get("sources") or [], answer["choices"][0]["message"]["content"])


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
