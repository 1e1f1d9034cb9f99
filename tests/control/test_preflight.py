"""Will a version fit: replicas placed node by node, surge room kept, Serve's defaults for what is unset."""

from __future__ import annotations

from pathlib import Path

from control.document import ServeDocument
from control.preflight import check_fit, deployment_replicas, free_by_node

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
