"""Will a new version fit? Its replicas' reservations, plus surge room for a replacement, against what
each node has free, decided before anything changes; and, where deployments autoscale, whether every
version could reach its `max_replicas` at once and still leave room for a replacement's surge.

Serve keeps an application that cannot be scheduled in DEPLOYING forever, holding whatever part of it
did fit, and an autoscaled replica that cannot be placed waits just as long, so the rollout asks this
first and refuses in seconds instead of waiting on a version that cannot start or cannot grow. Pure: it
takes the config and Ray's per-node usage as data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Serve's own defaults for a deployment the config does not size.
SERVE_DEFAULT_NUM_CPUS = 1.0
SERVE_DEFAULT_SURGE_PERCENT = 0
# Ray's resource bookkeeping is exact to 1e-4; below that a "shortfall" is rounding.
EPSILON = 1e-4
# What Ray names the resources that ray_actor_options reserve.
RESOURCE_OF_OPTION = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


@dataclass(frozen=True)
class Replicas:
    """One deployment's replicas: how many, what each reserves, and how many extra a replacement starts."""

    app: str
    deployment: str
    count: int  # what the deployment starts with (initial or min replicas for an autoscaled one)
    each: dict[str, float]
    surge: int  # extra replicas a replacement at full scale starts
    most: int  # max_replicas when autoscaled, else count

    @property
    def autoscaled(self) -> bool:
        return self.most != self.count

    @property
    def name(self) -> str:
        return f"{self.app}/{self.deployment}"


@dataclass
class Fit:
    fits: bool
    lines: list[str] = field(default_factory=list)
    suggestion: str = ""

    def report(self) -> str:
        text = "\n".join(self.lines)
        return f"{text}\n{self.suggestion}" if self.suggestion else text


def deployment_replicas(app: dict[str, Any]) -> list[Replicas]:
    """The replicas an application's config asks for (listed deployments; Serve defaults elsewhere)."""
    found = []
    for d in app.get("deployments") or []:
        options = d.get("ray_actor_options") or {}
        each = {RESOURCE_OF_OPTION[k]: float(v) for k, v in options.items() if k in RESOURCE_OF_OPTION and v}
        each.setdefault("CPU", SERVE_DEFAULT_NUM_CPUS if options.get("num_cpus") is None else 0.0)
        each.update({as_reported(k): float(v) for k, v in (options.get("resources") or {}).items()})
        count, most = replica_bounds(d)
        surge_pct = d.get("max_surge_percent", SERVE_DEFAULT_SURGE_PERCENT) or 0
        found.append(Replicas(app["name"], d["name"], count, each, math.ceil(most * surge_pct / 100), most))
    return found


def replica_bounds(deployment: dict[str, Any]) -> tuple[int, int]:
    """(replicas it starts with, the most it may run): `num_replicas` for a fixed deployment; for an
    autoscaled one its initial (or min, Serve's default 1) and max replicas (Serve's default 1)."""
    auto = deployment.get("autoscaling_config")
    if not auto:
        fixed = int(deployment.get("num_replicas") or 1)
        return fixed, fixed
    low = int(auto.get("min_replicas", 1))
    start = int(auto["initial_replicas"]) if auto.get("initial_replicas") is not None else low
    return start, max(start, int(auto.get("max_replicas", 1)))


def as_reported(resource: str) -> str:
    """A custom resource's name as the dashboard reports it: its JSON turns snake_case keys into
    camelCase (Ray's `to_camel_case`), resource names included, so `worker_node` arrives as `workerNode`."""
    first, *rest = resource.split("_")
    return first + "".join(part.title() for part in rest)


def free_by_node(usage_by_node: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Ray's `usageByNode` ({node: {resource: [used, total]}}) as what each node has free."""
    return {node: {r: total - used for r, (used, total) in usage.items()} for node, usage in usage_by_node.items()}


def capacity_by_node(usage_by_node: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Ray's `usageByNode` as what each node has in all."""
    return {node: {r: total for r, (_, total) in usage.items()} for node, usage in usage_by_node.items()}


def check_usage(new: list[Replicas], every: list[Replicas], usage_by_node: dict[str, dict[str, list[float]]]) -> Fit:
    """`check_fit` on Ray's `usageByNode` report: free room now, and the nodes' capacity at full scale."""
    return check_fit(new, every, free_by_node(usage_by_node), capacity_by_node(usage_by_node))


def check_fit(new: list[Replicas], every: list[Replicas], free: dict[str, dict[str, float]],
              capacity: dict[str, dict[str, float]] | None = None) -> Fit:
    """Place `new`'s starting replicas on the nodes' free resources (largest first), then require room left
    for the largest surge that any deployment in `every` (old and new) would start on a replacement.
    With `capacity` and any autoscaled deployment: every deployment of `every` at its `max_replicas`, plus
    that surge, must also fit in the nodes' capacity, or a scale-up under load would wait forever."""
    fit = _fit_now(new, every, free)
    if not fit.fits:
        fit.suggestion = _suggest(new, every, free)
    elif capacity is not None and any(r.autoscaled for r in every):
        _fit_at_full_scale(every, capacity, fit)
        if not fit.fits:
            fit.suggestion = _suggest([r for r in every if r.autoscaled], every, capacity, at_full_scale=True)
    return fit


def _fit_at_full_scale(every: list[Replicas], capacity: dict[str, dict[str, float]], fit: Fit) -> None:
    left = {node: dict(res) for node, res in capacity.items()}
    needed = _total([(r.each, r.most) for r in every])
    largest = _largest_surge(every)
    surge = f", plus {_describe(_total([(largest.each, largest.surge)]))} for {largest.name}'s surge" if largest else ""
    fit.lines.append(f"at full scale (every deployment at max_replicas) the versions reserve {_describe(needed)}"
                     f"{surge}, of {_describe(_total([(res, 1) for res in capacity.values()]))}")
    for replicas in sorted(every, key=lambda r: -r.each.get("CPU", 0)):
        placed = sum(1 for _ in range(replicas.most) if _place(replicas.each, left))
        if placed < replicas.most:
            fit.fits = False
            fit.lines.append(f"at full scale only {placed} of {replicas.name}'s {replicas.most} replicas "
                             f"({_describe(replicas.each)} each) find room: lower its max_replicas or its reservation")
            return
    if not _surge_fits(every, left):
        fit.fits = False
        fit.lines.append("at full scale no room remains for a replacement's surge replicas; free then: "
                         f"{_describe_nodes(left)}")


def _largest_surge(every: list[Replicas]) -> Replicas | None:
    """The deployment whose replacement would start the most (CPU) in surge replicas."""
    surges = [r for r in every if r.surge]
    return max(surges, key=lambda r: r.surge * r.each.get("CPU", 0)) if surges else None


def _surge_fits(every: list[Replicas], left: dict[str, dict[str, float]]) -> bool:
    largest = _largest_surge(every)
    if largest is None:
        return True
    trial = {node: dict(res) for node, res in left.items()}
    return all(_place(largest.each, trial) for _ in range(largest.surge))


def _fit_now(new: list[Replicas], every: list[Replicas], free: dict[str, dict[str, float]]) -> Fit:
    left = {node: dict(res) for node, res in free.items()}
    fit = Fit(True, [f"free now: {_describe_nodes(free)}"])
    needed = _total([(r.each, r.count) for r in new])
    fit.lines.append(f"the new version reserves {_describe(needed)} in {sum(r.count for r in new)} replicas")
    for replicas in sorted(new, key=lambda r: -r.each.get("CPU", 0)):
        for _ in range(replicas.count):
            if not _place(replicas.each, left):
                fit.fits = False
                fit.lines.append(f"no node has room for a {replicas.name} replica ({_describe(replicas.each)})")
    largest = _largest_surge(every)
    if fit.fits and largest and not _surge_fits(every, left):
        fit.fits = False
        fit.lines.append(f"after it, no room remains for replacing {largest.name} ({largest.surge} surge "
                         f"replica(s) of {_describe(largest.each)}); free then: {_describe_nodes(left)}")
    return fit


def _place(each: dict[str, float], left: dict[str, dict[str, float]]) -> bool:
    for resources in left.values():
        if all(resources.get(r, 0.0) + EPSILON >= amount for r, amount in each.items() if amount):
            for r, amount in each.items():
                resources[r] = resources.get(r, 0.0) - amount
            return True
    return False


def _suggest(new: list[Replicas], every: list[Replicas], free: dict[str, dict[str, float]],
             at_full_scale: bool = False) -> str:
    """num_cpus for the new version's deployments (at full scale: every autoscaled one), scaled by one
    factor, that would fit beside the rest."""
    free_cpu = sum(res.get("CPU", 0.0) for res in free.values())
    largest_surge = max((r.surge * r.each.get("CPU", 0.0) for r in every), default=0.0)
    fixed = sum(r.most * r.each.get("CPU", 0.0) for r in every if not r.autoscaled) if at_full_scale else 0.0
    needed = sum((r.most if at_full_scale else r.count) * r.each.get("CPU", 0.0) for r in new) + largest_surge
    if needed <= 0 or free_cpu - fixed <= 0:
        return "no CPU is free: remove a version or add a node before rolling out"
    factor = (free_cpu - fixed) / needed * 0.95
    scaled = {r.deployment: max(0.01, math.floor(r.each["CPU"] * factor * 100) / 100) for r in new if r.each.get("CPU")}
    settings = ", ".join(f"{name}.num_cpus={cpus:g}" for name, cpus in sorted(scaled.items()))
    whose = "autoscaled deployments'" if at_full_scale else "new version's"
    fewer = "lower max_replicas" if at_full_scale else "with fewer replicas"
    return (f"it would fit with the {whose} reservations scaled by {factor:.2f} ({settings}), {fewer}, or on a "
            "bigger cluster; num_cpus is scheduling bookkeeping, not a limit")


def _total(items: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for each, count in items:
        for r, amount in each.items():
            total[r] = total.get(r, 0.0) + amount * count
    return total


def _describe(resources: dict[str, float]) -> str:
    parts = [f"{v / 2**30:.1f} GiB memory" if r == "memory" else f"{v:.2f} {r}"
             for r, v in sorted(resources.items()) if v and not r.startswith(("node:", "object"))]
    return ", ".join(parts) or "nothing"


def _describe_nodes(free: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"node {node[:8]}: {_describe({r: v for r, v in res.items() if r in ('CPU', 'GPU')})}"
                     for node, res in free.items()) or "no nodes"
