"""Drives a rollout on a running cluster: check that the new version fits, add it at weight 0, wait until
it serves, copy users' answered questions to it and compare its answers with the stable version's
(the shadow stage: no user sees it), shift traffic step by step while comparing it with the stable version
(live requests and copies), then promote, or put everything back as it was.

It never strands the service:
- the state, with the config as it was, is written before the first change, under a lock that refuses a
  second `start`;
- any failure, timeout or abort request during start, steps or promotion rolls back by itself: weights
  back to stable, the canary drained and removed, the config file restored to its text from before;
- the config file is written only after the cluster accepted the change, and atomically;
- it fails closed: no stats, too few answers or a canary that stopped serving roll back (or hold, if so
  configured), never promote.

All cluster I/O goes through a `Cluster` (see `control.cluster.ClusterClient`), and time through
`sleep` and `clock`, so every path runs against a fake in milliseconds.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from control.document import ServeDocument, write_atomically
from control.judge import Verdict, judge, judge_golden, judge_shadow, knowledge_bases_served
from control.preflight import check_usage, deployment_replicas
from rag import golden
from rag.config import RolloutConfig, validate
from rag.errors import InvalidRequestError

ACTIVE = ("running", "held")


class Cluster(Protocol):
    def apply(self, config: dict[str, Any]) -> None: ...
    def applications(self) -> dict[str, Any]: ...
    def resource_usage(self) -> dict[str, dict[str, list[float]]]: ...
    def serving(self) -> set[str]: ...
    def scaled_to_zero(self) -> dict[str, list[str]]: ...
    def stats(self, window_s: float | None) -> dict[str, Any]: ...
    def evaluate(self, version: str, kb: str, items: list[golden.GoldenItem]) -> dict[str, Any]: ...


class RolloutBusyError(InvalidRequestError):
    """Another `rollout start` holds the lock on this config."""


class AbortRequestedError(Exception):
    """An operator asked for an abort while this process drives the rollout."""


@dataclass
class RolloutState:
    new: str
    stable: str
    before: str  # the config file's text before the first change: what a rollback restores
    target: str = ""  # the config that adds the new version at weight 0
    phase: str = "starting"  # starting | shadowing | stepping | promoting | done
    shadow: bool = True  # a shadow stage first, and copies to the candidate during the steps
    judge: dict[str, Any] = field(default_factory=dict)  # this rollout's own `rollout` settings (--judge)
    step: int = 0
    status: str = "running"  # running | held | promoted | rolled_back | aborted
    reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


PHASES = ("starting", "shadowing", "stepping", "promoting", "done")
STATUSES = (*ACTIVE, "promoted", "rolled_back", "aborted")


def judged_by(configured: RolloutConfig, judge: dict[str, Any]) -> RolloutConfig:
    """The gateway's `rollout` settings with this rollout's own (`--judge ttft_slack_s=2`: a switch from
    the extractive default to a language model is slower by design), validated as the config is."""
    if not judge:
        return configured
    merged = configured.model_dump()
    for dotted, value in judge.items():
        *parents, last = dotted.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        node[last] = value
    return validate(RolloutConfig, merged, "--judge settings (the gateway's rollout settings)")


def parse_state(raw: bytes, path: Path) -> RolloutState:
    """The state file as this tool wrote it, or one clear error that names the file: a corrupt or foreign
    file must stop `start`, `abort` and `status` with a sentence, never a traceback or a guess."""
    def refuse(what: str) -> InvalidRequestError:
        return InvalidRequestError(f"{path} is not a rollout state file this tool wrote ({what}); if no rollout "
                                   "is running, move it away and run `rollout status`")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise refuse(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise refuse(f"a JSON {type(data).__name__}, not an object")
    unknown = sorted(set(data) - {f.name for f in fields(RolloutState)})
    missing = sorted(k for k in ("new", "stable", "before") if k not in data)
    if unknown or missing:
        raise refuse(f"unknown fields {unknown}" if unknown else f"missing {missing}")
    types: dict[str, type] = {"step": int, "history": list, "shadow": bool, "judge": dict}  # the rest: strings
    wrong = sorted(k for k, v in data.items() if not isinstance(v, types.get(k, str))
                   or (isinstance(v, bool) and types.get(k) is not bool))
    if wrong:
        raise refuse(f"wrong types for {wrong}")
    if data.get("phase", "starting") not in PHASES or data.get("status", "running") not in STATUSES:
        raise refuse(f"phase {data.get('phase')!r} / status {data.get('status')!r}")
    return RolloutState(**data)


class Rollout:
    def __init__(self, config_path: str | Path, cluster: Cluster, *, dry_run: bool = False,
                 say: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(config_path)
        self.state_path = self.path.with_name(self.path.name + ".rollout.json")
        self.lock_path = self.path.with_name(self.path.name + ".rollout.lock")
        self.abort_path = self.path.with_name(self.path.name + ".rollout.abort")
        self.cluster, self.dry_run, self.say, self.sleep, self.clock = cluster, dry_run, say, sleep, clock

    # -- commands ---------------------------------------------------------------------------------
    def start(self, new: str, copy_of: str | None = None, overrides: dict[str, Any] | None = None,
              resume: bool = False, shadow: bool | None = None, judge: dict[str, Any] | None = None) -> str:
        """Run the rollout of `new` to its end; returns the final status (promoted, rolled_back, aborted, held)."""
        with self._locked():
            state = self.load_state()
            if resume:
                if not state or state.status not in ACTIVE or state.new != new:
                    raise InvalidRequestError(f"no interrupted or held rollout of {new!r} to resume")
            elif state and state.status in ACTIVE:
                raise InvalidRequestError(f"a rollout of {state.new!r} is {state.status}: resume it or abort it")
            else:
                state = self._plan(new, copy_of, overrides or {}, shadow, judge or {})
                if self.dry_run:
                    return "dry_run"
            self.abort_path.unlink(missing_ok=True)
            return self._drive(state)

    def abort(self, wait_s: float = 600) -> str:
        """Put the cluster and the file back as they were before the rollout, whatever state it is in. When
        another process is driving it, ask that process to roll back and wait for it."""
        try:
            with self._locked():
                state = self.load_state()
                if not state or state.status not in ACTIVE:
                    raise InvalidRequestError("no rollout is in progress" + (
                        f" (the last, of {state.new!r}, ended {state.status})" if state else ""))
                self._retreat(state, "aborted", "operator abort")
                return state.status
        except RolloutBusyError:
            self.abort_path.touch()
            self.say("event=ROLLOUT_ABORT_REQUESTED waiting for the running rollout to roll back")
            deadline = self.clock() + wait_s
            while self.clock() < deadline:
                state = self.load_state()
                if state and state.status not in ACTIVE:
                    return state.status
                self.sleep(1)
            raise TimeoutError(f"the running rollout did not roll back within {wait_s:g}s") from None

    def status(self) -> dict[str, Any]:
        """What the state file, the config file and the cluster hold, and whether file and cluster agree."""
        state, doc = self.load_state(), ServeDocument.load(self.path)
        file_apps = sorted(a["name"] for a in doc.data["applications"])
        try:
            cluster_apps = sorted(self.cluster.applications())
        except Exception as exc:
            cluster_apps, error = [], f"{type(exc).__name__}: {exc}"
        else:
            error = ""
        summary = asdict(state) if state else None
        if summary:
            summary.pop("before")
            summary.pop("target")
        return {"rollout": summary, "file": {"applications": file_apps, "weights": doc.weights},
                "cluster": {"applications": cluster_apps, "serving": sorted(self.cluster.serving()),
                            **({"error": error} if error else {})},
                "agree": not error and file_apps == cluster_apps}

    # -- phases -----------------------------------------------------------------------------------
    def _plan(self, new: str, copy_of: str | None, overrides: dict[str, Any], shadow: bool | None,
              judge: dict[str, Any]) -> RolloutState:
        """Nothing changes here: the target config is built, checked, and checked to fit the cluster."""
        before = self.path.read_text(encoding="utf-8")
        doc = ServeDocument.load(self.path)
        stable = doc.stable_version(excluding=new)
        if new not in doc.versions:
            if not copy_of and not overrides:
                raise InvalidRequestError(f"version {new!r} is not in {self.path}: add its application, or "
                                          "give --from VERSION and --set KEY=VALUE to derive it")
            doc.add_version(new, copy_of or stable, {"version": new, **overrides})
        if pins := doc.pin_latest(new):
            self._log("ROLLOUT_PIN", version=new, knowledge_bases=pins)
        doc.set_weights({**doc.weights, new: 0})
        doc.check()
        judged_by(doc.gateway.rollout, judge)  # a bad --judge stops the rollout here, before any change
        self._preflight(doc, new)
        state = RolloutState(new, stable, before, doc.dump(),
                             shadow=doc.gateway.rollout.shadow.enabled if shadow is None else shadow, judge=judge)
        if self.dry_run:
            self.say(state.target)
        return state

    def _preflight(self, doc: ServeDocument, new: str) -> None:
        running = set(self.cluster.applications())
        if new in running:
            self._log("ROLLOUT_PREFLIGHT", version=new, result="already deployed")
            return
        every = [r for app in doc.plain()["applications"] for r in deployment_replicas(app)]
        fit = check_usage([r for r in every if r.app == new], every, self.cluster.resource_usage())
        self._log("ROLLOUT_PREFLIGHT", version=new, fits=fit.fits)
        for line in fit.report().splitlines():
            self.say(f"    {line}")
        if not fit.fits:
            raise InvalidRequestError(f"version {new!r} does not fit on this cluster; nothing was changed.\n"
                                      + fit.report())

    def _drive(self, state: RolloutState) -> str:
        self._save_state(state)
        cfg = judged_by(ServeDocument.load(self.path).gateway.rollout, state.judge)
        try:
            if state.phase == "starting":
                self._apply(ServeDocument.from_text(state.target), f"add {state.new} at weight 0 beside {state.stable}")
                self._wait_serving(state.new, cfg)
                doc = ServeDocument.load(self.path)
                served = knowledge_bases_served(doc.served_knowledge_bases(state.new),
                                                doc.served_knowledge_bases(state.stable))
                self._log("ROLLOUT_KNOWLEDGE_BASES", new=state.new, action=served.action, reason=served.reason)
                if served.action == "rollback":
                    self._record(state, served, "start", 0)
                    return state.status
                if not self._run_golden(state, cfg, "start", 0):
                    return state.status
                state.phase = "shadowing" if state.shadow else "stepping"
            if state.phase == "shadowing":
                if not self._run_shadow(state, cfg):
                    return state.status
                state.phase = "stepping"
            if state.phase == "stepping" and (not self._run_steps(state, cfg)
                                              or not self._run_golden(state, cfg, "before promotion", 100)):
                return state.status
            state.phase = "promoting"
            self._promote(state, cfg)
        except AbortRequestedError:
            self._retreat(state, "aborted", "operator abort")
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into this): the operator stops it
            self._retreat(state, "aborted", "interrupted")
        except Exception as exc:
            self._log("ROLLOUT_FAILED", new=state.new, phase=state.phase, error=f"{type(exc).__name__}: {exc}")
            self._retreat(state, "rolled_back", f"{state.phase} failed: {exc}")
        return state.status

    def _run_steps(self, state: RolloutState, cfg: RolloutConfig) -> bool:
        """True when every step passed; otherwise the rollout has been rolled back or is held."""
        state.status = "running"
        for index in range(state.step, len(cfg.steps)):
            pct = cfg.steps[index]
            state.step = index
            doc = ServeDocument.load(self.path)
            doc.set_weights({**doc.weights, state.new: pct, state.stable: 100 - pct})
            self._apply(doc, f"step {index + 1}/{len(cfg.steps)}: {state.new} {pct:g}%")
            self._save_state(state)
            if not self._record(state, self._observe(state, cfg), index, pct):
                return False
        return True

    def _run_shadow(self, state: RolloutState, cfg: RolloutConfig) -> bool:
        """Copies of answered questions go to the candidate until `min_pairs` are judged or `max_s` is
        spent; True when the candidate passed. The copies go on through the steps."""
        doc = ServeDocument.load(self.path)
        doc.set_shadow(state.new)
        self._apply(doc, f"shadow: copy answered questions to {state.new}; users see {state.stable}'s answers")
        self._save_state(state)
        began = self.clock()
        verdict = Verdict("wait", "no pairs yet", rule="evidence")
        while (elapsed := self.clock() - began) < cfg.shadow.max_s:
            self._pause(min(cfg.interval_s, cfg.shadow.max_s - elapsed))
            if state.new not in self.cluster.serving():
                verdict = Verdict("rollback", f"canary {state.new} stopped serving", rule="serving")
                break
            try:
                # The pairs since the stage began (a second more: the gateways report every half second).
                stats = self.cluster.stats(self.clock() - began + 1)
            except Exception as exc:
                verdict = Verdict("wait", f"stats unreadable ({exc})", rule="evidence")
            else:
                verdict = judge_shadow(stats.get(state.new, {}), cfg)
            self._log("ROLLOUT_SHADOW_CHECK", new=state.new, action=verdict.action, rule=verdict.rule,
                      reason=verdict.reason)
            if verdict.action != "wait":
                break
        if verdict.action == "wait":
            verdict = Verdict(cfg.on_inconclusive, f"no shadow judgement after {cfg.shadow.max_s:g}s "
                                                   f"({verdict.reason}); {cfg.on_inconclusive} rather than promote",
                              verdict.numbers, verdict.rule)
        return self._record(state, verdict, "shadow", 0)

    def _run_golden(self, state: RolloutState, cfg: RolloutConfig, when: str, pct: float) -> bool:
        """The golden sets of the KBs the candidate serves, on candidate and stable; True to go on. A KB
        without a golden set is not evaluated; a set that cannot be read or run is no pass."""
        if not cfg.quality.enabled:
            return True
        doc = ServeDocument.load(self.path)
        try:
            root = doc.kb_root(state.new)
            sets = {kb: items for kb in sorted(doc.served_knowledge_bases(state.new))
                    if (items := golden.read_items(root, kb))}
            if not sets:
                self._log("ROLLOUT_GOLDEN", new=state.new, when=when, result="no knowledge base has a golden set")
                return True
            results = {kb: {"candidate": self.cluster.evaluate(state.new, kb, items),
                            "stable": self.cluster.evaluate(state.stable, kb, items)} for kb, items in sets.items()}
        except Exception as exc:
            verdict = Verdict(cfg.on_inconclusive, f"golden sets could not be run ({type(exc).__name__}: {exc}); "
                                                   f"{cfg.on_inconclusive} rather than promote", rule="golden")
        else:
            verdict = judge_golden(results, cfg)
            if verdict.action == "wait":
                verdict = Verdict(cfg.on_inconclusive, f"{verdict.reason}; {cfg.on_inconclusive} rather than promote",
                                  verdict.numbers, verdict.rule)
        self._log("ROLLOUT_GOLDEN", new=state.new, when=when, action=verdict.action, rule=verdict.rule,
                  reason=verdict.reason)
        return self._record(state, verdict, f"golden ({when})", pct)

    def _record(self, state: RolloutState, verdict: Verdict, stage: str | int, pct: float) -> bool:
        """Keep the verdict in the history; True when the rollout goes on."""
        state.history.append({"step": stage, "percent": pct, "action": verdict.action, "rule": verdict.rule,
                              "reason": verdict.reason, "numbers": verdict.numbers})
        if verdict.action == "rollback":
            self._retreat(state, "rolled_back", verdict.reason)
            return False
        if verdict.action == "hold":
            state.status, state.reason = "held", verdict.reason
            self._save_state(state)
            self._log("ROLLOUT_HELD", new=state.new, stage=stage, rule=verdict.rule, reason=verdict.reason)
            return False
        self._save_state(state)
        return True

    def _observe(self, state: RolloutState, cfg: RolloutConfig) -> Verdict:
        verdict = Verdict("wait", "not observed yet")
        for waited in range(1, cfg.max_wait_intervals + 1):
            self._pause(cfg.interval_s)
            if state.new not in self.cluster.serving():
                return Verdict("rollback", f"canary {state.new} stopped serving", rule="serving")
            try:
                stats = self.cluster.stats(cfg.interval_s * waited)
            except Exception as exc:
                verdict = Verdict("wait", f"stats unreadable ({exc})", rule="evidence")
            else:
                verdict = judge(stats.get(state.new, {}), stats.get(state.stable), cfg)
            self._log("ROLLOUT_CHECK", new=state.new, step=state.step, action=verdict.action, rule=verdict.rule,
                      reason=verdict.reason)
            if verdict.action != "wait":
                return verdict
        return Verdict(cfg.on_inconclusive, f"no judgement after {cfg.max_wait_intervals} intervals "
                                            f"({verdict.reason}); {cfg.on_inconclusive} rather than promote",
                       verdict.numbers, verdict.rule)

    def _promote(self, state: RolloutState, cfg: RolloutConfig) -> None:
        if state.new not in self.cluster.serving():
            raise RuntimeError(f"canary {state.new} is not serving at promotion")
        doc = ServeDocument.load(self.path)
        doc.set_weights({**doc.weights, state.new: 100, state.stable: 0})
        doc.set_shadow(None)
        self._apply(doc, f"promote {state.new}: the old version {state.stable} gets no new requests")
        self._wait_idle(state.stable, cfg.drain_timeout_s)
        follow = doc.follow_latest_like(state.new, state.stable) if state.stable in doc.versions else []
        if follow:
            self._log("ROLLOUT_FOLLOW_LATEST", version=state.new, knowledge_bases=follow)
        doc.remove_version(state.stable)
        self._apply(doc, f"remove {state.stable}: Serve drains what it still holds")
        if follow:  # new args: Serve replaces the version's replicas one by one, each drained
            self._wait_running(state.new, cfg.start_timeout_s)
        self._finish(state, "promoted", "every step passed")

    def _wait_running(self, version: str, timeout_s: float) -> None:
        """Until Serve reports the version's application RUNNING again (its replacement finished)."""
        deadline = self.clock() + timeout_s
        self.sleep(1.0)  # Serve takes the new config asynchronously
        while self.clock() < deadline:
            if self._app_status(version).get("status") == "RUNNING":
                return
            self.sleep(1.0)
        self._log("ROLLOUT_REPLACE_SLOW", version=version, timeout_s=timeout_s, serve=self._stuck(version))

    def _retreat(self, state: RolloutState, status: str, reason: str) -> None:
        """Weights back to stable while the canary still exists, wait for its answers, then the config
        from before, whole: applications it lacks are drained and removed by Serve."""
        self._log("ROLLOUT_RETREAT", new=state.new, stable=state.stable, reason=reason)
        before = ServeDocument.from_text(state.before)
        current = ServeDocument.load(self.path)
        if state.new in current.versions and state.new not in before.versions:
            current.set_weights({**before.weights, state.new: 0})
            current.set_shadow(None)
            self._apply(current, f"send all traffic back to {state.stable}: {reason}")
            self._wait_idle(state.new, judged_by(current.gateway.rollout, state.judge).drain_timeout_s, abortable=False)
        self._apply(before, f"restore the config from before the rollout of {state.new}")
        write_atomically(self.path, state.before)
        self._finish(state, status, reason)

    def _finish(self, state: RolloutState, status: str, reason: str) -> None:
        state.status, state.reason, state.phase = status, reason, "done"
        self._save_state(state)
        self.abort_path.unlink(missing_ok=True)
        self._log("ROLLOUT_DONE", new=state.new, status=status, reason=reason)

    # -- cluster I/O ------------------------------------------------------------------------------
    def _apply(self, doc: ServeDocument, what: str) -> None:
        """The cluster first: the file records only what the cluster accepted."""
        doc.check()
        self._log("ROLLOUT_APPLY", what=what, weights=doc.weights)
        self.cluster.apply(doc.plain())
        doc.save(self.path)

    def _wait_serving(self, version: str, cfg: RolloutConfig) -> None:
        deadline = self.clock() + cfg.start_timeout_s
        while self.clock() < deadline:
            # A version whose stages may scale to zero is routable while cold; it is judged only once the
            # gateway has woken it (it wakes every version it is told about), so a cold start is never
            # taken for the canary's latency.
            if version in self.cluster.serving() and not self.cluster.scaled_to_zero().get(version):
                self._log("ROLLOUT_SERVING", version=version)
                return
            app = self._app_status(version)
            if app.get("status") == "DEPLOY_FAILED":
                raise RuntimeError(f"version {version} failed to deploy: {app.get('message')}")
            self._pause(1)
        raise TimeoutError(f"version {version} was not serving after {cfg.start_timeout_s:g}s; "
                           f"Serve says: {self._stuck(version)}")

    def _app_status(self, version: str) -> dict[str, Any]:
        """Serve's view of one application; empty while the dashboard does not answer (a busy machine:
        the caller's deadline, not one slow answer, decides)."""
        try:
            app: dict[str, Any] = self.cluster.applications().get(version, {})
            return app
        except Exception as exc:
            self._log("ROLLOUT_STATUS_UNREADABLE", version=version, error=f"{type(exc).__name__}: {exc}")
            return {}

    def _stuck(self, version: str) -> str:
        try:
            app = self.cluster.applications().get(version) or {}
        except Exception as exc:
            return f"(status unreadable: {exc})"
        stuck = {name: f"{d.get('status')}: {d.get('message')}" for name, d in (app.get("deployments") or {}).items()
                 if d.get("status") != "HEALTHY"}
        return json.dumps(stuck or {version: f"{app.get('status')}: {app.get('message')}"})

    def _wait_idle(self, version: str, timeout_s: float, abortable: bool = True) -> None:
        """Until the gateways hold no request of `version`; unreadable stats wait out the timeout, after
        which Serve's own drain still finishes the requests when the application is removed."""
        deadline = self.clock() + timeout_s
        self.sleep(1.0)  # the weight change reaches the gateways asynchronously
        while self.clock() < deadline:
            try:
                if self.cluster.stats(None).get(version, {}).get("in_flight", 0) == 0:
                    return
            except Exception as exc:
                self._log("ROLLOUT_DRAIN_UNKNOWN", version=version, error=str(exc))
            self._pause(0.5) if abortable else self.sleep(0.5)
        self._log("ROLLOUT_DRAIN_TIMEOUT", version=version, timeout_s=timeout_s)

    def _pause(self, seconds: float) -> None:
        self.sleep(seconds)
        if self.abort_path.exists():
            raise AbortRequestedError

    # -- state, lock and logs ---------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RolloutBusyError(f"another rollout command is running on {self.path} "
                                       f"(it holds {self.lock_path})") from None
            yield
        finally:
            os.close(fd)

    def load_state(self) -> RolloutState | None:
        if not self.state_path.exists():
            return None
        return parse_state(self.state_path.read_bytes(), self.state_path)

    def _save_state(self, state: RolloutState) -> None:
        write_atomically(self.state_path, json.dumps(asdict(state), indent=2, default=str))

    def _log(self, event: str, **fields: Any) -> None:
        self.say(" ".join([f"event={event}", *(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())]))
