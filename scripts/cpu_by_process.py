"""CPU time of this machine's processes, grouped by what they are to the benchmark, from `/proc`.

`make bench` reads it around every cell, so each row of its CPU table says how many milliseconds of CPU
a request took in each Serve process, the project's replicas next to the floor's of the same role.
Where the cores are the limit (concurrency 8 on 2 cores), the totals decide throughput, and the
in-process side's CPU per request (the same pipeline with no Serve: the work) tells the work from the
project's own overhead.

Linux only: elsewhere `snapshot()` is empty and the benchmark leaves the table out.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import defaultdict
from pathlib import Path

PROXY, CLIENT, REST = "HTTP proxy", "client (this benchmark)", "Ray's other processes"
# Processes that are not Ray's, the benchmark's or the service's: shown, but not counted in a side's total.
NOISE = "not Ray (left out of the total)"
RAY = re.compile(r"\bray\b")  # ray::Actor titles, .../site-packages/ray/... paths, ray-dashboard-*
REPLICA_TITLE = "ray::ServeReplica:"
Totals = dict[tuple[str, str], float]  # CPU milliseconds by (owner, role)
STAGES = ("Gateway", "Pipeline", "Embedder", "Retriever", "Generator")
OTHER_REPLICAS = "its other actors (KB manager, stats)"
PROJECT_ACTORS = ("ray::StatsBoard",)  # the project's plain (non-Serve) actors


def role(title: str, floor_app: str) -> tuple[str, str]:
    """(owner, role) for a process title: a Serve replica of the floor's app is ("floor", its
    project-named stage), a replica of any other app ("project", its deployment), Serve's proxy is
    shared, as are Ray's other processes; the rest is noise."""
    if title.startswith(REPLICA_TITLE):
        app, _, deployment = title[len(REPLICA_TITLE):].split()[0].partition(":")
        deployment = deployment.split(".")[0]  # Ray may add the running method to the title
        if app == floor_app:
            return "floor", deployment.removeprefix("Floor")
        return "project", deployment
    if title.startswith(PROJECT_ACTORS):
        return "project", title.split()[0].removeprefix("ray::")
    if title.startswith("ray::ProxyActor"):
        return "shared", PROXY
    return "shared", REST if RAY.search(title) else NOISE


def proc_stat(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...); [] if there is no such process."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return []


def _cpu_ms(pid: str, tick_ms: float) -> float | None:
    fields = proc_stat(pid)
    if len(fields) < 13:  # gone between the listing and the read
        return None
    return (int(fields[11]) + int(fields[12])) * tick_ms  # utime + stime


def snapshot(floor_app: str) -> Totals:
    """CPU milliseconds used so far by the live processes, summed by (owner, role)."""
    if not Path("/proc/self/stat").exists():
        return {}
    tick_ms, me, totals = 1000 / os.sysconf("SC_CLK_TCK"), str(os.getpid()), defaultdict[tuple[str, str], float](float)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        used = _cpu_ms(pid, tick_ms)
        if used is None:
            continue
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        totals[("shared", CLIENT) if pid == me else role(title, floor_app)] += used
    return dict(totals)


def used_between(before: Totals, after: Totals) -> dict[str, float]:
    """CPU milliseconds per (owner, role) between two snapshots, keyed "owner/role". A process that
    started in between counts from its start; one that ended counts nothing for the interval."""
    return {f"{owner}/{name}": max(0.0, used - before.get((owner, name), 0.0))
            for (owner, name), used in after.items()}


def per_request(cpu_ms: dict[str, float], owner: str, requests: int) -> dict[str, float]:
    """One side's CPU milliseconds per request in a cell, by row: its own replicas by stage (the others it
    runs beside them together), the shared processes, and the total. The other side's replicas, idle
    in this cell, are left out: they are not this side's cost; so is the noise (a neighbour's CPU)."""
    rows = dict.fromkeys([*STAGES, OTHER_REPLICAS, PROXY, CLIENT, REST, NOISE], 0.0)
    for key, used in cpu_ms.items():
        who, _, name = key.partition("/")
        if who == "shared":
            rows[name] += used
        elif who == owner:
            rows[name if name in STAGES else OTHER_REPLICAS] += used
    per = {name: used / max(1, requests) for name, used in rows.items()}
    per["total"] = sum(used for name, used in per.items() if name != NOISE)
    return per
