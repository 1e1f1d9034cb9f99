"""Readiness decisions from Serve application states (no cluster needed)."""

from __future__ import annotations

from enum import Enum

from deployments.gateway.readiness import AppState, RoutePrimer, app_states_from_details, assess

STAGES = {"Pipeline": 1, "Embedder": 1, "Retriever": 1, "Generator": 1}


def test_ready_when_every_stage_of_every_live_version_runs() -> None:
    state = assess(["v1"], {"v1": AppState("RUNNING", STAGES), "gateway": AppState("RUNNING", {"Gateway": 1})})
    assert state.ready and state.serving == {"v1", "gateway"} and not state.waiting_for


def test_starting_lists_what_it_waits_for() -> None:
    apps = {"v1": AppState("RUNNING", STAGES), "v2": AppState("DEPLOYING", {**STAGES, "Generator": 0})}
    state = assess(["v1", "v2"], apps)
    assert not state.ready and state.waiting_for == ["v2/Generator"] and state.serving == {"v1"}
    assert assess(["v3"], {}).waiting_for == ["v3 (not_started)"]


def test_rolling_update_keeps_serving() -> None:
    # Old replicas still RUNNING while new ones start.
    assert assess(["v1"], {"v1": AppState("DEPLOYING", STAGES)}).ready


def test_rebuild_after_args_change_keeps_serving_only_what_served_before() -> None:
    rebuilding = {"v1": AppState("DEPLOYING", {})}
    assert assess(["v1"], rebuilding, previously_serving={"v1"}).ready
    assert not assess(["v1"], rebuilding).ready


def test_a_failed_or_deleting_version_is_not_serving() -> None:
    for status in ("DEPLOY_FAILED", "DELETING"):
        assert not assess(["v1"], {"v1": AppState(status, STAGES)}, previously_serving={"v1"}).ready


def test_a_version_serves_only_once_its_route_is_primed() -> None:
    calls: list[str] = []
    broken = {"v2"}

    def prime(version: str, cold: list[str]) -> None:
        calls.append(version)
        if version in broken:
            raise TimeoutError("router not populated")

    primer = RoutePrimer(prime)
    apps = {"v1": AppState("RUNNING", STAGES), "v2": AppState("RUNNING", STAGES),
            "gateway": AppState("RUNNING", {"Gateway": 1})}
    state = primer.apply(["v1", "v2"], ["v1", "v2"], assess(["v1", "v2"], apps))
    # The gateway's own app is not a version: never primed, and still listed as serving.
    assert calls == ["v1", "v2"] and state.serving == {"v1", "gateway"}
    assert not state.ready and state.waiting_for == ["v2 (gateway route)"]
    broken.clear()
    state = primer.apply(["v1", "v2"], ["v1", "v2"], assess(["v1", "v2"], apps))
    assert calls == ["v1", "v2", "v2"] and state.ready and state.serving == {"v1", "v2", "gateway"}


def test_a_weight_zero_version_is_primed_but_never_awaited() -> None:
    primer = RoutePrimer(lambda version, cold: (_ for _ in ()).throw(TimeoutError("not yet")))
    apps = {"v1": AppState("RUNNING", STAGES), "v2": AppState("RUNNING", STAGES)}
    state = primer.apply(["v1", "v2"], ["v1"], assess(["v1"], apps))
    assert state.serving == set() and state.waiting_for == ["v1 (gateway route)"]


def test_a_removed_version_is_primed_again_when_it_returns() -> None:
    calls: list[str] = []
    primer = RoutePrimer(lambda version, cold: calls.append(version))
    with_v2 = {"v1": AppState("RUNNING", STAGES), "v2": AppState("RUNNING", STAGES)}
    primer.apply(["v1", "v2"], ["v1"], assess(["v1"], with_v2))
    primer.apply(["v1"], ["v1"], assess(["v1"], {"v1": AppState("RUNNING", STAGES)}))
    primer.apply(["v1", "v2"], ["v1"], assess(["v1"], with_v2))
    assert calls == ["v1", "v2", "v2"]


class _State(Enum):  # the controller's answer holds Serve's enums, as this stands in for
    RUNNING = "RUNNING"
    STARTING = "STARTING"


def test_states_from_the_controllers_plain_answer() -> None:
    details = {"applications": {
        "v1": {"status": _State.RUNNING, "deployments": {
            "Embedder": {"replicas": [{"state": _State.RUNNING}, {"state": _State.STARTING}]},
            "Generator": {"replicas": [{"state": "STARTING"}]}}},
        "v2": {"status": "DEPLOYING", "deployments": {}}}}
    assert app_states_from_details(details) == {"v1": AppState("RUNNING", {"Embedder": 1, "Generator": 0}),
                                                 "v2": AppState("DEPLOYING", {})}
    assert app_states_from_details({}) == {}


def test_the_private_controller_answer_still_has_the_shape_read() -> None:
    """`read_app_states` reads the controller's plain answer through Ray's private client (one adapter);
    the names it depends on, as Ray 2.60 has them, so an upgrade that moves them fails here, not in a
    replica that then reports nothing ready."""
    import inspect

    from ray.serve._private.api import _get_global_client
    from ray.serve._private.client import ServeControllerClient
    from ray.serve.schema import ApplicationDetails, DeploymentDetails, ReplicaDetails, ServeInstanceDetails

    assert "raise_if_no_controller_running" in inspect.signature(_get_global_client).parameters
    assert callable(ServeControllerClient.get_serve_details)
    assert {"applications"} <= set(ServeInstanceDetails.model_fields)
    assert {"status", "deployments"} <= set(ApplicationDetails.model_fields)
    assert {"replicas", "deployment_config"} <= set(DeploymentDetails.model_fields)
    from ray.serve.schema import DeploymentSchema

    assert "autoscaling_config" in DeploymentSchema.model_fields
    assert {"state"} <= set(ReplicaDetails.model_fields)
    replica = ReplicaDetails.model_validate({"replica_id": "r1", "state": "RUNNING", "start_time_s": 0.0})
    shown = replica.model_dump(exclude_unset=True)  # the controller's dict holds Serve's enums, as here
    assert app_states_from_details({"applications": {"v1": {"status": "RUNNING", "deployments": {
        "Embedder": {"replicas": [shown]}}}}}) == {"v1": AppState("RUNNING", {"Embedder": 1})}


def test_a_stage_at_zero_by_design_is_cold_not_starting() -> None:
    cold = AppState("RUNNING", {**STAGES, "Generator": 0, "Embedder": 0}, frozenset({"Generator", "Embedder"}))
    state = assess(["v1"], {"v1": cold})
    assert state.ready and state.serving == {"v1"} and state.scaled_to_zero == {"v1": ["Embedder", "Generator"]}
    assert state.replicas["v1"] == {**STAGES, "Generator": 0, "Embedder": 0}
    # At zero without allowing it (min_replicas >= 1): a replica is missing, so the version is starting.
    missing = AppState("RUNNING", {**STAGES, "Generator": 0}, frozenset({"Embedder"}))
    state = assess(["v1"], {"v1": missing})
    assert not state.ready and state.waiting_for == ["v1/Generator"] and not state.scaled_to_zero


def test_a_cold_version_is_woken_not_primed() -> None:
    calls: list[tuple[str, list[str]]] = []
    primer = RoutePrimer(lambda version, cold: calls.append((version, cold)))
    apps = {"v1": AppState("RUNNING", STAGES),
            "v2": AppState("RUNNING", {**STAGES, "Generator": 0}, frozenset({"Generator"}))}
    state = primer.apply(["v1", "v2"], ["v1"], assess(["v1"], apps))
    assert calls == [("v1", []), ("v2", ["Generator"])]
    assert state.ready and state.scaled_to_zero == {"v2": ["Generator"]}


def test_zero_allowed_is_read_from_the_autoscaling_config() -> None:
    details = {"applications": {"v1": {"status": "RUNNING", "deployments": {
        "Generator": {"replicas": [], "deployment_config": {"autoscaling_config": {"min_replicas": 0}}},
        "Embedder": {"replicas": [], "deployment_config": {"autoscaling_config": {"min_replicas": 1}}},
        "Retriever": {"replicas": [], "deployment_config": {"num_replicas": 1}}}}}}
    assert app_states_from_details(details)["v1"].may_be_zero == {"Generator"}


def test_a_first_start_is_starting_but_a_wake_up_of_a_serving_version_is_not() -> None:
    starting = AppState("RUNNING", {**STAGES, "Generator": 0}, frozenset({"Generator"}), {"Generator": 1})
    first = assess(["v1"], {"v1": starting})
    assert not first.ready and first.waiting_for == ["v1/Generator"]  # its initial replica is not up yet
    woken = assess(["v1"], {"v1": starting}, previously_serving={"v1"})
    assert woken.ready and woken.scaled_to_zero == {"v1": ["Generator"]}  # a request is waking it: still routable
    idle = AppState("RUNNING", {**STAGES, "Generator": 0}, frozenset({"Generator"}), {"Generator": 0})
    assert assess(["v1"], {"v1": idle}).ready  # scaled to zero by the autoscaler: ready, cold


def test_targets_are_read_from_the_controllers_answer() -> None:
    details = {"applications": {"v1": {"status": "RUNNING", "deployments": {
        "Generator": {"replicas": [], "target_num_replicas": 1,
                      "deployment_config": {"autoscaling_config": {"min_replicas": 0}}}}}}}
    assert app_states_from_details(details)["v1"].targets == {"Generator": 1}


# As Ray 2.60 reports a deployment whose replicas fail to start (their warm-up raised).
STARTUP_FAILED = (
    "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or initial "
    "health check failing. See controller logs for details. Error:\n"
    "ray::ServeReplica:v2:Generator.initialize_and_get_metadata() (pid=17320, ip=192.0.2.2)\n"
    '  File "/srv/.venv/lib/python3.11/site-packages/ray/serve/_private/replica.py", line 1928, in initialize\n'
    "    raise RuntimeError(traceback.format_exc()) from None\n"
    "RuntimeError: Traceback (most recent call last):\n"
    '  File "/srv/rag/upstream.py", line 160, in warmup\n'
    "rag.errors.ServiceUnavailableError: the upstream of model 'qwen' is unavailable: APIConnectionError\n")


def test_a_stage_waited_for_says_why_in_one_line_without_frames_or_paths() -> None:
    from deployments.gateway.readiness import deployment_problem

    failing = {"status": "UNHEALTHY", "status_trigger": "REPLICA_STARTUP_FAILED", "message": STARTUP_FAILED,
               "replicas": [{"state": "STARTING"}]}
    why = deployment_problem(failing)
    assert why == ("UNHEALTHY (replica_startup_failed): ServiceUnavailableError: the upstream of model 'qwen' "
                   "is unavailable: APIConnectionError")
    assert deployment_problem({"status": "HEALTHY", "message": ""}) is None
    assert deployment_problem({"status": "UPDATING", "status_trigger": "CONFIG_UPDATE_STARTED"}) == \
        "UPDATING (config_update_started)"
    states = app_states_from_details({"applications": {"v2": {"status": "RUNNING", "deployments": {
        "Embedder": {"status": "HEALTHY", "replicas": [{"state": "RUNNING"}]}, "Generator": failing}}}})
    state = assess(["v2"], states)
    assert state.waiting_for == ["v2/Generator"] and state.why == {"v2/Generator": why}
