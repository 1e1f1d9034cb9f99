"""Overload: N concurrent streamed chats at once against a running gateway (the demo's by default).

    python -m scripts.bench_overload --streams 300

Each stream is either served (200, complete with [DONE]), refused at once (503 or 429 with Retry-After),
or counted as hung when it has not finished within --deadline seconds. Prints a table of outcomes and
the latency of the accepted streams. A benchmark, not a test: it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from rag.auth import bearer
from rag.client import DEFAULT_KEY_FILE, client_key
from rag.loadgen import QUESTIONS
from rag.quantiles import quantile


@dataclass
class Outcome:
    kind: str  # "200", "503+retry-after", "429+retry-after", "hung", "complete=False", other statuses
    seconds: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key-file", default=DEFAULT_KEY_FILE)
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds after which a stream counts as hung")
    return parser.parse_args(argv)


async def one_stream(client: httpx.AsyncClient, question: str) -> Outcome:
    body = {"model": "samples", "stream": True, "messages": [{"role": "user", "content": question}]}
    started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            retry = "+retry-after" if response.headers.get("retry-after") else "-no-retry-after"
            kind = f"{response.status_code}{retry}" if response.status_code in (429, 503, 504) else \
                str(response.status_code)
            return Outcome(kind, time.perf_counter() - started)
        done = False
        async for line in response.aiter_lines():
            done = done or line.strip() == "data: [DONE]"
    return Outcome("200" if done else "200-incomplete", time.perf_counter() - started)


async def bounded(client: httpx.AsyncClient, question: str, deadline_s: float) -> Outcome:
    started = time.perf_counter()
    try:
        return await asyncio.wait_for(one_stream(client, question), deadline_s)
    except TimeoutError:
        return Outcome("hung", time.perf_counter() - started)
    except httpx.HTTPError as exc:
        return Outcome(f"transport:{type(exc).__name__}", time.perf_counter() - started)


async def run(args: argparse.Namespace) -> list[Outcome]:
    limits = httpx.Limits(max_connections=args.streams, max_keepalive_connections=args.streams)
    timeout = httpx.Timeout(args.deadline, connect=10.0)
    async with httpx.AsyncClient(base_url=args.url, headers=bearer(client_key(args.api_key_file)),
                                 limits=limits, timeout=timeout) as client:
        return await asyncio.gather(*(bounded(client, QUESTIONS[i % len(QUESTIONS)], args.deadline)
                                      for i in range(args.streams)))


def report(outcomes: list[Outcome], wall_s: float) -> str:
    counts = Counter(o.kind for o in outcomes)
    lines = [f"{len(outcomes)} concurrent streams, {wall_s:.1f}s wall", "", f"{'outcome':24} {'count':>6} "
             f"{'p50 s':>7} {'p99 s':>7} {'max s':>7}"]
    for kind, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        seconds = sorted(o.seconds for o in outcomes if o.kind == kind)
        lines.append(f"{kind:24} {count:6d} {quantile(seconds, 0.5) or 0.0:7.2f} {quantile(seconds, 0.99) or 0.0:7.2f} "
                     f"{seconds[-1]:7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    outcomes = asyncio.run(run(args))
    print(report(outcomes, time.perf_counter() - started))
    hung = sum(1 for o in outcomes if o.kind == "hung")
    return 1 if hung else 0


if __name__ == "__main__":
    sys.exit(main())
