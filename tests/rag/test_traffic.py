"""Weighted and sticky choice of the pipeline version that answers a request."""

from __future__ import annotations

import random
from collections import Counter

from rag.config import TrafficConfig
from rag.traffic import TrafficSplit


def _split(weights: dict[str, float], seed: int = 1234) -> TrafficSplit:
    return TrafficSplit(TrafficConfig(weights=weights), rng=random.Random(seed))


def test_ninety_ten_split_within_two_points() -> None:
    split = _split({"v1": 90, "v2": 10})
    counts = Counter(split.choose() for _ in range(10_000))
    assert set(counts) == {"v1", "v2"}
    assert abs(counts["v1"] / 10_000 - 0.90) <= 0.02
    assert abs(counts["v2"] / 10_000 - 0.10) <= 0.02


def test_split_follows_weights_not_names() -> None:
    split = _split({"b": 10, "a": 90}, seed=7)
    counts = Counter(split.choose() for _ in range(10_000))
    assert abs(counts["a"] / 10_000 - 0.90) <= 0.02


def test_three_way_split() -> None:
    split = _split({"v1": 50, "v2": 30, "v3": 20}, seed=99)
    counts = Counter(split.choose() for _ in range(10_000))
    for version, share in {"v1": 0.5, "v2": 0.3, "v3": 0.2}.items():
        assert abs(counts[version] / 10_000 - share) <= 0.02, counts


def test_seeded_choices_repeat() -> None:
    a, b = _split({"v1": 50, "v2": 50}, seed=3), _split({"v1": 50, "v2": 50}, seed=3)
    picks = [a.choose() for _ in range(200)]
    assert picks == [b.choose() for _ in range(200)]
    assert set(picks) == {"v1", "v2"}


def test_zero_weight_version_never_chosen() -> None:
    split = _split({"v1": 100, "v2": 0})
    assert {split.choose() for _ in range(5_000)} == {"v1"}
    assert {split.choose(f"user-{i}") for i in range(2_000)} == {"v1"}


def test_same_key_same_version_and_keys_spread() -> None:
    split = _split({"v1": 50, "v2": 50})
    other_instance = _split({"v1": 50, "v2": 50}, seed=999)  # stickiness does not depend on the rng
    chosen = {}
    for i in range(2_000):
        key = f"conversation-{i}"
        version = split.choose(key)
        assert all(split.choose(key) == version for _ in range(3))
        assert other_instance.choose(key) == version
        chosen[key] = version
    counts = Counter(chosen.values())
    assert set(counts) == {"v1", "v2"}
    assert abs(counts["v1"] / 2_000 - 0.5) <= 0.05, counts


def test_sticky_keys_follow_weights() -> None:
    split = _split({"v1": 90, "v2": 10})
    counts = Counter(split.choose(f"user-{i}") for i in range(10_000))
    assert abs(counts["v2"] / 10_000 - 0.10) <= 0.02, counts


def test_unicode_and_empty_keys_are_sticky() -> None:
    split = _split({"v1": 50, "v2": 50})
    for key in ["用户-42", "", "🙂"]:
        assert len({split.choose(key) for _ in range(20)}) == 1


def test_single_version_always_chosen() -> None:
    split = _split({"only": 1})
    assert {split.choose() for _ in range(1_000)} == {"only"}
    assert {split.choose(f"k{i}") for i in range(1_000)} == {"only"}


def test_live_lists_only_positive_weights() -> None:
    split = _split({"v3": 5, "v1": 0, "v2": 95})
    assert sorted(split.live) == ["v2", "v3"]
    assert "v1" not in split.live
    split.live.append("v9")  # a copy: callers cannot change the split
    assert sorted(split.live) == ["v2", "v3"]
