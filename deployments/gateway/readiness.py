"""Readiness of the versions that carry traffic, polled in the background from `serve.status()`.

`serve.status()` is a blocking controller call that costs 60-290 ms inside a replica, so `/ready`
answers from the last snapshot instead of asking per probe. Most of that cost is not the call: it is
parsing the controller's answer into pydantic models (which cloudpickles every deployment's request
router on the way), 30-60 ms of CPU with the GIL held for seven deployments and more with every
version. The poll reads the controller's plain answer instead, and falls back to `serve.status()`
where that is unavailable.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from ray import serve

logger = logging.getLogger("rag.gateway")

_NOT_SERVING = ("NOT_STARTED", "DEPLOY_FAILED", "DELETING")


class AppState(NamedTuple):
    status: str
    running: dict[str, int]  # deployment name -> replicas RUNNING
    may_be_zero: frozenset[str] = frozenset()  # deployments whose autoscaling allows zero replicas
    targets: Mapping[str, int] = MappingProxyType({})  # deployment -> replicas Serve wants now (absent: unknown)
    problems: Mapping[str, str] = MappingProxyType({})  # deployment -> why it is not healthy, in one line


AppStates = dict[str, AppState]


@dataclass(frozen=True)
class Readiness:
    ready: bool
    waiting_for: list[str] = field(default_factory=list)
    checked_at: float = 0.0
    serving: set[str] = field(default_factory=set)  # versions whose every stage has a running replica or may be cold
    scaled_to_zero: dict[str, list[str]] = field(default_factory=dict)  # version -> its stages at zero by design
    replicas: dict[str, dict[str, int]] = field(default_factory=dict)  # app -> deployment -> running replicas
    why: dict[str, str] = field(default_factory=dict)  # a waited-for "version/stage" -> why, as Serve reports it


def _serves(app: AppState, served_before: bool) -> bool:
    """Every stage has a running replica, or may be at zero and is: scaled to zero (Serve wants none), or
    waking (Serve starts one for a request) in a version that served before. A version's first start,
    its stages' initial replicas coming up, is starting, not cold."""
    def stage_serves(name: str, running: int) -> bool:
        return running >= 1 or (name in app.may_be_zero and (app.targets.get(name, 0) == 0 or served_before))
    return bool(app.running) and app.status not in _NOT_SERVING and \
        all(stage_serves(name, n) for name, n in app.running.items())


def assess(live_versions: list[str], apps: AppStates, previously_serving: set[str] | frozenset[str] = frozenset()
           ) -> Readiness:
    """Ready when every deployment of every live version has a running (so warmed-up) replica, or is at
    zero replicas because its autoscaling allows it: such a stage is cold, and a request wakes it.

    Counting running replicas rather than requiring status HEALTHY keeps the service ready during a
    rolling update, when a deployment is UPDATING but its old replicas still answer.
    """
    waiting: list[str] = []
    serving = {name for name, app in apps.items() if _serves(app, name in previously_serving)}
    # While Serve rebuilds an application after an args change, it lists no deployments at all, yet
    # the old replicas keep answering until their replacements are up: still serving.
    serving |= {name for name, app in apps.items()
                if not app.running and app.status == "DEPLOYING" and name in previously_serving}
    cold = {name: sorted(d for d, n in apps[name].running.items() if n < 1 and d in apps[name].may_be_zero)
            for name in serving}
    for version in live_versions:
        app = apps.get(version, AppState("NOT_STARTED", {}))
        status, deployments = app.status, app.running
        if version in serving:
            continue
        if not deployments or status in _NOT_SERVING:
            waiting.append(f"{version} ({status.lower()})")
            continue
        waiting += [f"{version}/{name}" for name, running in sorted(deployments.items()) if running < 1]
    why = {f"{version}/{stage}": problem for version in live_versions if version in apps
           for stage, problem in apps[version].problems.items() if f"{version}/{stage}" in waiting}
    return Readiness(not waiting, waiting, time.time(), serving, {v: stages for v, stages in cold.items() if stages},
                     {name: dict(app.running) for name, app in apps.items()}, why)


def read_app_states() -> AppStates:
    details = _serve_details()
    if details is not None:
        return app_states_from_details(details)
    status = serve.status()
    return {name: AppState(_word(app.status), {d: _running(s.replica_states) for d, s in app.deployments.items()})
            for name, app in status.applications.items()}


def app_states_from_details(details: dict[str, Any]) -> AppStates:
    """The states in the controller's plain answer (what `serve.status()` parses): per application its
    status and per deployment its replicas, each with a `state`, and its autoscaling's `min_replicas`."""
    return {name: AppState(_word(app["status"]),
                           {d: sum(1 for r in dep.get("replicas", []) if _word(r.get("state")) == "RUNNING")
                            for d, dep in app.get("deployments", {}).items()},
                           frozenset(d for d, dep in app.get("deployments", {}).items() if _may_be_zero(dep)),
                           {d: int(dep["target_num_replicas"]) for d, dep in app.get("deployments", {}).items()
                            if dep.get("target_num_replicas") is not None},
                           {d: why for d, dep in app.get("deployments", {}).items()
                            if (why := deployment_problem(dep)) is not None})
            for name, app in details.get("applications", {}).items()}


_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
PROBLEM_CHARS = 300


def deployment_problem(deployment: dict[str, Any]) -> str | None:
    """Why a deployment is not healthy, in one line a probe may show: its status and trigger, and the
    last exception its message names (Serve puts a replica's whole start-up traceback there: only the
    error's own line is kept, never the frames and paths above it). None when it is healthy."""
    status = _word(deployment.get("status"))
    if status in ("HEALTHY", "None", ""):
        return None
    line = f"{status} ({_word(deployment.get('status_trigger')).lower()})"
    raised = [m for row in str(deployment.get("message") or "").splitlines() if (m := _RAISED.match(row.strip()))]
    if raised:
        line += f": {raised[-1].group(1)}: {raised[-1].group(2)}"
    return line[:PROBLEM_CHARS]


def _may_be_zero(deployment: dict[str, Any]) -> bool:
    auto = (deployment.get("deployment_config") or {}).get("autoscaling_config") or {}
    return bool(auto) and int(auto.get("min_replicas", 1)) == 0


def _serve_details() -> dict[str, Any] | None:
    """The controller's plain answer; None where this Ray has no such client (then `serve.status()`)."""
    try:
        from ray.serve._private.api import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return {} if client is None else dict(client.get_serve_details())
    except (ImportError, AttributeError, TypeError):
        return None


def _word(value: Any) -> str:
    return str(getattr(value, "value", value))


def _running(replica_states: dict) -> int:
    return sum(n for state, n in replica_states.items() if _word(state) == "RUNNING")


class RoutePrimer:
    """Counts a version as serving only once `prime(version)` has succeeded: the gateway opens its
    route to the version (handle, router, replica list) before sending it a user's request."""

    def __init__(self, prime: Callable[[str, list[str]], None]) -> None:
        self._prime = prime
        self.primed: set[str] = set()

    def apply(self, named: list[str], live: list[str], state: Readiness) -> Readiness:
        """`state` less the serving versions, of those the traffic config names, whose route could not
        be primed yet."""
        self.primed &= state.serving  # a version that comes back after removal is primed again
        for version in sorted(state.serving.intersection(named) - self.primed):
            began = time.monotonic()
            try:
                self._prime(version, state.scaled_to_zero.get(version, []))
            except Exception as exc:  # not routable yet: leave it out, try again at the next poll
                logger.warning("event=ROUTE_PRIME_FAILED version=%s error=%r", version, exc)
                continue
            self.primed.add(version)
            logger.info("event=ROUTE_READY version=%s seconds=%.3f", version, time.monotonic() - began)
        unprimed = state.serving.intersection(named) - self.primed
        waiting = state.waiting_for + [f"{v} (gateway route)" for v in sorted(unprimed) if v in live]
        return Readiness(not waiting, waiting, state.checked_at, state.serving - unprimed, state.scaled_to_zero,
                         state.replicas, state.why)


class ReadinessMonitor:
    """A daemon thread keeping a fresh `Readiness` for the versions `live()` returns (weight > 0);
    `named()` (all versions in the weights, 0 included) are primed as soon as they serve."""

    def __init__(self, live: Callable[[], list[str]], interval_s: float, read_states: Callable[[], AppStates],
                 prime: Callable[[str, list[str]], None] = lambda version, cold: None,
                 named: Callable[[], list[str]] | None = None,
                 on_states: Callable[[AppStates], None] = lambda states: None) -> None:
        self._live = live
        self._read_states = read_states
        self._named = named or live
        self._interval_s = interval_s
        self._routes = RoutePrimer(prime)
        self._on_states = on_states
        self.current = Readiness(False, ["first status check"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                live = self._live()
                states = self._read_states()
                self._on_states(states)
                state = assess(live, states, self.current.serving)
                self.current = self._routes.apply(self._named(), live, state)
            except Exception as exc:  # the controller may be briefly unreachable; report, keep polling
                # Keep routing to what was serving: a controller hiccup should not refuse traffic.
                self.current = Readiness(False, [f"serve status unavailable: {exc}"], time.time(),
                                         self.current.serving)
                logger.warning("event=READINESS_POLL_FAILED error=%r", exc)
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()
