"""Will a version fit: replicas placed node by node, surge room kept, Serve's defaults for what is unset."""

from __future__ import annotations

from pathlib import Path

from control.document import ServeDocument
from control.preflight import check_fit, check_usage, deployment_replicas, free_by_node

REPO = Path(__file__).resolve().parents[2]


def app(name: str, *deployments: dict) -> dict:
    return {"name": name, "deployments": list(deployments)}


def test_replicas_read_serves_defaults_for_what_the_config_leaves_out() -> None:
    found = deployment_replicas(app("v2", {"name": "A"}, {"name": "B", "num_replicas": 3, "max_surge_percent": 50,
                                                          "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25,
                                                                                "resources": {"fast_ssd": 1}}},
                                    {"name": "C", "autoscaling_config": {"min_replicas": 2, "max_replicas": 9},
                                     "ray_actor_options": {"num_cpus": 0}}))
    a, b, c = found
    assert (a.count, a.each, a.surge) == (1, {"CPU": 1.0}, 0)  # Serve: 1 replica, 1 CPU, no surge
    assert (b.count, b.each, b.surge) == (3, {"CPU": 0.5, "GPU": 0.25, "fastSsd": 1.0}, 2)
    assert (c.count, c.each) == (2, {"CPU": 0.0})


def test_a_replica_must_fit_on_one_node_not_in_the_cluster_total() -> None:
    new = deployment_replicas(app("v2", {"name": "G", "ray_actor_options": {"num_cpus": 0.8}}))
    split = {"a": {"CPU": 0.5}, "b": {"CPU": 0.5}}
    fit = check_fit(new, new, split)
    assert not fit.fits and "no node has room for a v2/G replica (0.80 CPU)" in fit.report()
    assert check_fit(new, new, {"a": {"CPU": 0.3}, "b": {"CPU": 0.9}}).fits


def test_surge_room_is_kept_for_the_largest_replacement_of_any_version() -> None:
    def generator(cpus: float) -> dict:
        return {"name": "G", "max_surge_percent": 100, "ray_actor_options": {"num_cpus": cpus}}

    old, new = deployment_replicas(app("v1", generator(0.5))), deployment_replicas(app("v2", generator(0.2)))
    assert check_fit(new, old + new, {"n": {"CPU": 0.7}}).fits
    fit = check_fit(new, old + new, {"n": {"CPU": 0.6}})
    assert not fit.fits and "no room remains for replacing v1/G" in fit.report()
    assert "G.num_cpus=" in fit.suggestion


def test_the_shipped_config_fits_a_canary_and_surge_beside_itself_on_the_demo_machine() -> None:
    doc = ServeDocument.load(REPO / "serve_config.yaml")
    doc.add_version("v2", "v1", {"version": "v2"})
    every = [r for a in doc.plain()["applications"] for r in deployment_replicas(a)]
    held = sum(r.count * r.each["CPU"] for r in every if r.app != "v2")
    assert check_fit([r for r in every if r.app == "v2"], every, {"demo": {"CPU": 2.0 - held}}).fits
    gpu = ServeDocument.load(REPO / "serve_config.gpu.yaml")
    gpu.add_version("v2", "v1", {"version": "v2"})
    every = [r for a in gpu.plain()["applications"] for r in deployment_replicas(a)]
    held_gpu = sum(r.count * r.each.get("GPU", 0) for r in every if r.app != "v2")
    assert check_fit([r for r in every if r.app == "v2"], every, {"gpu": {"CPU": 64, "GPU": 1.0 - held_gpu}}).fits


def test_free_by_node_reads_rays_usage_report() -> None:
    assert free_by_node({"n1": {"CPU": [1.5, 2.0], "GPU": [0.0, 1.0]}}) == {"n1": {"CPU": 0.5, "GPU": 1.0}}


def test_autoscaled_replicas_start_at_initial_or_min_and_surge_at_max() -> None:
    (a, b, c) = deployment_replicas(app(
        "v2", {"name": "A", "autoscaling_config": {"min_replicas": 0, "max_replicas": 4}, "max_surge_percent": 50},
        {"name": "B", "autoscaling_config": {"min_replicas": 1, "initial_replicas": 2, "max_replicas": 3}},
        {"name": "C", "num_replicas": 2, "max_surge_percent": 100}))
    assert (a.count, a.most, a.surge, a.autoscaled) == (0, 4, 2, True)
    assert (b.count, b.most, b.autoscaled) == (2, 3, True)
    assert (c.count, c.most, c.surge, c.autoscaled) == (2, 2, 2, False)


def _two_versions(max_generators: int) -> tuple[list, list]:
    def version(name: str) -> dict:
        return app(name, {"name": "G", "max_surge_percent": 50, "ray_actor_options": {"num_cpus": 0.25},
                          "autoscaling_config": {"min_replicas": 1, "max_replicas": max_generators}})
    old, new = deployment_replicas(version("v1")), deployment_replicas(version("v2"))
    return new, old + new


def test_full_scale_of_every_version_plus_a_surge_must_fit_the_nodes_capacity() -> None:
    # Both versions at 3 Generators (1.5 CPU) and a surge of 2 (0.5) need all of 2 CPUs.
    new, every = _two_versions(3)
    usage = {"n": {"CPU": [0.25, 2.0]}}  # only v1's one starting replica is placed now
    fit = check_usage(new, every, usage)
    assert fit.fits, fit.report()
    assert "reserve 1.50 CPU, plus 0.50 CPU for v1/G's surge, of 2.00 CPU" in fit.report()
    new, every = _two_versions(4)  # 2 CPUs at full scale: no room for the surge
    fit = check_usage(new, every, usage)
    assert not fit.fits and "at full scale no room remains for a replacement's surge" in fit.report()
    assert "G.num_cpus=0.19" in fit.suggestion and "lower max_replicas" in fit.suggestion
    new, every = _two_versions(5)
    fit = check_usage(new, every, usage)
    assert not fit.fits and "at full scale only 3 of v2/G's 5 replicas" in fit.report()


def test_full_scale_counts_capacity_not_what_is_free_now() -> None:
    # v1 is scaled up now (3 replicas hold 0.75 CPU): a v2 that fits at full scale is not refused for it.
    new, every = _two_versions(3)
    assert check_usage(new, every, {"n": {"CPU": [0.75, 2.0]}}).fits


def test_fixed_replicas_are_not_held_to_a_full_scale_check() -> None:
    old = deployment_replicas(app("v1", {"name": "G", "ray_actor_options": {"num_cpus": 1.5}}))
    new = deployment_replicas(app("v2", {"name": "G", "ray_actor_options": {"num_cpus": 0.5}}))
    fit = check_fit(new, old + new, {"n": {"CPU": 0.5}}, {"n": {"CPU": 2.0}})
    assert fit.fits and "full scale" not in fit.report()


def test_the_shipped_autoscaled_configs_fit_stable_and_canary_at_full_scale_with_a_surge() -> None:
    for name, capacity in (("serve_config.yaml", {"CPU": 2.0}), ("serve_config.gpu.yaml", {"CPU": 16.0, "GPU": 1.0})):
        doc = ServeDocument.load(REPO / name)
        doc.add_version("v2", "v1", {"version": "v2"})
        every = [r for a in doc.plain()["applications"] for r in deployment_replicas(a)]
        assert any(r.autoscaled for r in every), name
        held = {res: sum(r.count * r.each.get(res, 0.0) for r in every if r.app != "v2") for res in capacity}
        usage = {"node": {res: [held[res], total] for res, total in capacity.items()}}
        fit = check_usage([r for r in every if r.app == "v2"], every, usage)
        assert fit.fits, (name, fit.report())
