"""The CPU accounting of `make bench` (scripts.cpu_by_process): which process counts for which side, and
per-request rows that leave the other side's idle replicas and other programs out of a side's total."""

from __future__ import annotations

import time

import pytest

from scripts import cpu_by_process as cpu


@pytest.mark.parametrize(("title", "expected"), [
    ("ray::ServeReplica:floor:FloorEmbedder     ", ("floor", "Embedder")),
    ("ray::ServeReplica:v1:Embedder", ("project", "Embedder")),
    ("ray::ServeReplica:v2:Generator.handle_request_streaming()", ("project", "Generator")),
    ("ray::ServeReplica:gateway:KnowledgeBases", ("project", "KnowledgeBases")),
    ("ray::StatsBoard  ", ("project", "StatsBoard")),
    ("ray::ProxyActor", ("shared", cpu.PROXY)),
    ("ray::ServeController", ("shared", cpu.REST)),
    ("/x/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp", ("shared", cpu.REST)),
    ("ray-dashboard-NodeHead-0 (/x/python -B -c", ("shared", cpu.REST)),
    ("/usr/bin/python -m something", ("shared", cpu.NOISE)),
    ("/usr/bin/gray-array", ("shared", cpu.NOISE)),
])
def test_each_process_counts_for_its_side(title: str, expected: tuple[str, str]) -> None:
    assert cpu.role(title, "floor") == expected


def test_this_process_is_the_client_and_its_cpu_is_counted() -> None:
    before = cpu.snapshot("floor")
    spent = time.process_time()
    while time.process_time() - spent < 0.2:
        pass
    used = cpu.used_between(before, cpu.snapshot("floor"))
    assert 150 <= used[f"shared/{cpu.CLIENT}"] <= 1000


def test_a_sides_rows_leave_the_other_sides_replicas_out() -> None:
    used = {"floor/Gateway": 100.0, "floor/Embedder": 40.0, "project/Gateway": 150.0, "project/Embedder": 120.0,
            "project/KnowledgeBases": 10.0, "project/StatsBoard": 6.0, f"shared/{cpu.PROXY}": 80.0,
            f"shared/{cpu.CLIENT}": 30.0, f"shared/{cpu.REST}": 50.0, f"shared/{cpu.NOISE}": 900.0}
    floor = cpu.per_request(used, "floor", 10)
    project = cpu.per_request(used, "project", 10)
    assert floor["Gateway"] == 10.0 and floor["Embedder"] == 4.0 and floor[cpu.OTHER_REPLICAS] == 0.0
    assert floor["total"] == pytest.approx((100 + 40 + 80 + 30 + 50) / 10)
    assert project["Gateway"] == 15.0 and project[cpu.OTHER_REPLICAS] == pytest.approx(1.6)
    assert project["total"] == pytest.approx((150 + 120 + 16 + 80 + 30 + 50) / 10)  # a neighbour's CPU not in it
    assert project[cpu.NOISE] == floor[cpu.NOISE] == 90.0
    assert cpu.per_request({}, "project", 0)["total"] == 0.0
