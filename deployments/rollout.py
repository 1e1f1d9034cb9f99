"""Drives a rollout on a running cluster: add the new version at weight 0, wait until it serves,
shift traffic step by step while comparing it with the stable version, then promote or roll back.

Every step is written to the config file first and then applied declaratively, so the file on disk
always matches what runs; a small state file beside it lets an interrupted rollout resume or abort.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deployments import ops
from rag.config import RolloutConfig
from rag.errors import InvalidRequestError
from rag.rollout import ServeDocument, Verdict, judge


@dataclass
class RolloutState:
    new: str
    stable: str
    step: int = 0
    status: str = "running"  # running | promoted | rolled_back | aborted
    history: list[dict[str, Any]] = field(default_factory=list)


class Rollout:
    def __init__(self, config_path: str | Path, *, dashboard: str = ops.DASHBOARD, gateway: str = ops.GATEWAY,
                 dry_run: bool = False, say: Callable[[str], None] = print,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = Path(config_path)
        self.state_path = self.path.with_name(self.path.name + ".rollout.json")
        self.dashboard, self.gateway = dashboard, gateway
        self.dry_run, self.say, self.sleep = dry_run, say, sleep

    # -- commands ---------------------------------------------------------------------------------
    def start(self, new: str, copy_of: str | None = None, overrides: dict[str, Any] | None = None,
              resume: bool = False) -> str:
        """Run the rollout of `new` to the end; returns the final status (promoted or rolled_back)."""
        doc = ServeDocument.load(self.path)
        state = self._load_state()
        if state and state.status == "running" and not resume:
            raise InvalidRequestError(f"a rollout of {state.new!r} is in progress: resume it or abort it")
        if resume:
            if not state or state.status != "running" or state.new != new:
                raise InvalidRequestError(f"no interrupted rollout of {new!r} to resume")
        else:
            state = self._begin(doc, new, copy_of, overrides or {})
        return self._run_steps(doc, state, doc.gateway.rollout)

    def abort(self) -> None:
        state = self._load_state()
        if not state or state.status != "running":
            raise InvalidRequestError("no rollout is in progress")
        self._retreat(ServeDocument.load(self.path), state, "aborted", "operator abort")

    def status(self) -> dict[str, Any]:
        state = self._load_state()
        return {"rollout": asdict(state) if state else None, "weights": ServeDocument.load(self.path).weights,
                "ready": ops.readiness(self.gateway)[1], "stats": self._stats(None)}

    # -- phases -----------------------------------------------------------------------------------
    def _begin(self, doc: ServeDocument, new: str, copy_of: str | None, overrides: dict[str, Any]) -> RolloutState:
        stable = doc.stable_version(excluding=new)
        if new not in doc.versions:
            if not copy_of and not overrides:
                raise InvalidRequestError(f"version {new!r} is not in {self.path}: add its application, or "
                                          "give --from VERSION and --set KEY=VALUE to derive it")
            doc.add_version(new, copy_of or stable, {"version": new, **overrides})
        if pins := doc.pin_latest(new):
            self._log("ROLLOUT_PIN", version=new, knowledge_bases=pins)
        doc.set_weights({**doc.weights, new: 0})
        self._apply(doc, f"add {new} at weight 0 beside stable {stable}")
        self._wait_serving(new, doc.gateway.rollout)
        state = RolloutState(new, stable)
        self._save_state(state)
        return state

    def _run_steps(self, doc: ServeDocument, state: RolloutState, cfg: RolloutConfig) -> str:
        for index in range(state.step, len(cfg.steps)):
            pct = cfg.steps[index]
            state.step = index
            doc.set_weights({**doc.weights, state.new: pct, state.stable: 100 - pct})
            self._apply(doc, f"step {index + 1}/{len(cfg.steps)}: {state.new} {pct:g}%")
            self._save_state(state)
            verdict = self._observe(state, cfg)
            state.history.append({"step": index, "percent": pct, "action": verdict.action,
                                  "reason": verdict.reason, "numbers": verdict.numbers})
            self._save_state(state)
            if verdict.action == "rollback":
                self._retreat(doc, state, "rolled_back", verdict.reason)
                return state.status
        self._promote(doc, state, cfg)
        return state.status

    def _observe(self, state: RolloutState, cfg: RolloutConfig) -> Verdict:
        if self.dry_run:
            return Verdict("continue", "dry run: nothing observed")
        verdict = Verdict("wait", "not observed yet")
        for waited in range(1, cfg.max_wait_intervals + 1):
            self.sleep(cfg.interval_s)
            stats = self._stats(cfg.interval_s * waited)
            verdict = judge(stats.get(state.new, {}), stats.get(state.stable), cfg)
            self._log("ROLLOUT_CHECK", new=state.new, step=state.step, action=verdict.action, reason=verdict.reason)
            if verdict.action != "wait":
                return verdict
        return Verdict("continue", f"no judgement possible ({verdict.reason}); continuing", verdict.numbers)

    def _promote(self, doc: ServeDocument, state: RolloutState, cfg: RolloutConfig) -> None:
        doc.set_weights({**doc.weights, state.new: 100, state.stable: 0})
        self._apply(doc, f"promote {state.new}: the old version {state.stable} gets no new requests")
        self._wait_idle(state.stable, cfg.drain_timeout_s)
        doc.remove_version(state.stable)
        self._apply(doc, f"remove {state.stable}: Serve drains what it still holds")
        state.status = "promoted"
        self._save_state(state)
        self._log("ROLLOUT_DONE", new=state.new, status=state.status)

    def _retreat(self, doc: ServeDocument, state: RolloutState, status: str, reason: str) -> None:
        # Weights back to stable in one update, then the canary is removed once it holds no request.
        doc.set_weights({**doc.weights, state.stable: 100, state.new: 0})
        self._apply(doc, f"roll back to {state.stable}: {reason}")
        self._wait_idle(state.new, doc.gateway.rollout.drain_timeout_s)
        doc.remove_version(state.new)
        self._apply(doc, f"remove {state.new}")
        state.status = status
        self._save_state(state)
        self._log("ROLLOUT_DONE", new=state.new, status=status, reason=reason)

    # -- cluster I/O ------------------------------------------------------------------------------
    def _apply(self, doc: ServeDocument, what: str) -> None:
        doc.check()
        self._log("ROLLOUT_APPLY", what=what, weights=doc.weights)
        if self.dry_run:
            self.say(doc.dump())
            return
        doc.save(self.path)
        ops.apply(doc.plain(), self.dashboard)

    def _wait_serving(self, version: str, cfg: RolloutConfig) -> None:
        if self.dry_run:
            return
        deadline = time.monotonic() + max(cfg.drain_timeout_s, 600)
        while time.monotonic() < deadline:
            if version in ops.readiness(self.gateway)[1].get("serving", []):
                self._log("ROLLOUT_SERVING", version=version)
                return
            failed = ops.applications(self.dashboard).get(version, {})
            if failed.get("status") == "DEPLOY_FAILED":
                raise RuntimeError(f"version {version} failed to deploy: {failed.get('message')}")
            self.sleep(1)
        raise TimeoutError(f"version {version} did not start serving")

    def _wait_idle(self, version: str, timeout_s: float) -> None:
        if self.dry_run:
            return
        deadline = time.monotonic() + timeout_s
        self.sleep(1.0)  # the weight change reaches the gateway asynchronously
        while time.monotonic() < deadline:
            left = self._stats(None).get(version, {}).get("in_flight", 0)
            if left == 0:
                return
            self.sleep(0.5)
        self._log("ROLLOUT_DRAIN_TIMEOUT", version=version, timeout_s=timeout_s)

    def _stats(self, window_s: float | None) -> dict[str, Any]:
        params = {"window_s": window_s} if window_s else {}
        try:
            return httpx.get(f"{self.gateway}/stats", params=params, timeout=10).json().get("versions", {})
        except (httpx.HTTPError, ValueError):
            return {}

    # -- state and logs ---------------------------------------------------------------------------
    def _load_state(self) -> RolloutState | None:
        if not self.state_path.exists():
            return None
        return RolloutState(**json.loads(self.state_path.read_text(encoding="utf-8")))

    def _save_state(self, state: RolloutState) -> None:
        if not self.dry_run:
            self.state_path.write_text(json.dumps(asdict(state), indent=2, default=str), encoding="utf-8")

    def _log(self, event: str, **fields: Any) -> None:
        self.say(" ".join([f"event={event}", *(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())]))
