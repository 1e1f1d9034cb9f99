"""The whole `serve_config.yaml` as Serve takes it: which application is which (by the builder its
`import_path` names), and the checks a config passes before it reaches a cluster: every application's
args, traffic only to deployed versions, no stream outliving a drain, no open gateway beyond loopback.

The names of the builders and deployments live here, once: the library (`rag`) knows none of them.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from rag.config import ConfigError, GatewayConfig, PipelineConfig, TrafficConfig, validate

# The builders in `deployments/app.py` that `import_path` names: they tell what an application is.
PIPELINE_BUILDER = "build_pipeline_app"
GATEWAY_BUILDER = "build_gateway_app"


def is_app(app: dict[str, Any], builder: str) -> bool:
    """Whether a Serve config application is built by `builder` (PIPELINE_BUILDER or GATEWAY_BUILDER)."""
    return str(app.get("import_path", "")).endswith(f":{builder}")


def pipeline_configs(serve_config: dict[str, Any]) -> dict[str, PipelineConfig]:
    """The pipeline versions a Serve config deploys, by version name."""
    found: dict[str, PipelineConfig] = {}
    for app in serve_config["applications"]:
        if is_app(app, PIPELINE_BUILDER):
            cfg = validate(PipelineConfig, app.get("args"), f"args of application {app.get('name')!r}")
            found[cfg.version] = cfg
    return found


# Serve's default when a deployment does not set it.
SERVE_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0
STREAMING_DEPLOYMENTS = ("Pipeline", "Generator")  # a stream is open on these for its whole life
GATEWAY_DEPLOYMENT = "Gateway"
KB_MANAGER_DEPLOYMENT = "KnowledgeBases"


def _graceful_timeouts(app: dict[str, Any]) -> dict[str, float]:
    given = {d.get("name"): d.get("graceful_shutdown_timeout_s") for d in app.get("deployments") or []}
    return {name: float(given.get(name) or SERVE_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S) for name in given}


def stream_drain_problems(serve_config: dict[str, Any]) -> list[str]:
    """Every place where a stream could outlive its replica's drain, so a redeploy would cut it."""
    problems: list[str] = []
    longest = 0.0
    for app in serve_config["applications"]:
        if not is_app(app, PIPELINE_BUILDER):
            continue
        cfg = validate(PipelineConfig, app.get("args"), f"args of application {app.get('name')!r}")
        bound = cfg.generation.max_stream_seconds + cfg.lifecycle.drain_margin_s
        longest = max(longest, bound)
        timeouts = _graceful_timeouts(app)
        for name in STREAMING_DEPLOYMENTS:
            timeout = timeouts.get(name, SERVE_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S)
            if timeout <= bound:
                problems.append(
                    f"application {app.get('name')!r}: {name}.graceful_shutdown_timeout_s ({timeout:g}) must be "
                    f"above generation.max_stream_seconds ({cfg.generation.max_stream_seconds:g}) + "
                    f"lifecycle.drain_margin_s ({cfg.lifecycle.drain_margin_s:g}) = {bound:g}; raise the timeout "
                    "or lower max_stream_seconds")
    for app in serve_config["applications"]:
        if is_app(app, GATEWAY_BUILDER):
            problems += _gateway_drain_problems(app, longest)
    return problems


def _gateway_drain_problems(app: dict[str, Any], longest_stream: float) -> list[str]:
    # An upload request waits up to knowledge_base.wait_s for its job (10 s more for the reply): a drain
    # must outlast that too, in the Gateway and in the KnowledgeBases manager it waits on, which also
    # gives running jobs stop_drain_s before recording them as interrupted.
    gateway = validate(GatewayConfig, app.get("args"), f"args of application {app.get('name')!r}")
    timeouts, problems = _graceful_timeouts(app), []
    settings = gateway.knowledge_base
    needs = {GATEWAY_DEPLOYMENT: max(longest_stream, settings.wait_s + 10),
             KB_MANAGER_DEPLOYMENT: max(settings.wait_s, settings.stop_drain_s) + 10}
    for name, bound in needs.items():
        timeout = timeouts.get(name, SERVE_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S)
        if timeout <= bound:
            problems.append(f"application {app.get('name')!r}: {name}.graceful_shutdown_timeout_s ({timeout:g}) must "
                            f"be above {bound:g}: the longest stream of any version plus its drain margin, and "
                            f"knowledge_base.wait_s ({settings.wait_s:g}) or stop_drain_s "
                            f"({settings.stop_drain_s:g}) + 10")
    return problems


# Deployments that must keep exactly one replica, and those that must keep at least one, whatever the
# autoscaler sees: the KnowledgeBases manager is the one writer of every knowledge base and holds its
# jobs; the Gateway answers /health and /ready and holds the requests that wait for a cold start.
SINGLE_REPLICA = (KB_MANAGER_DEPLOYMENT,)
ALWAYS_WARM = (GATEWAY_DEPLOYMENT,)


def autoscaling_problems(serve_config: dict[str, Any]) -> list[str]:
    """Autoscaling settings that Serve would refuse or that would break a promise of this service."""
    problems: list[str] = []
    for app in serve_config["applications"]:
        for d in app.get("deployments") or []:
            auto, where = d.get("autoscaling_config"), f"application {app.get('name')!r}: {d.get('name')}"
            if not auto:
                continue
            if d.get("num_replicas") not in (None, "auto"):
                problems.append(f"{where} sets both num_replicas ({d['num_replicas']}) and autoscaling_config; "
                                "keep one (min_replicas/max_replicas bound an autoscaled deployment)")
            low, high = int(auto.get("min_replicas", 1)), int(auto.get("max_replicas", 1))
            if high < max(low, 1):
                problems.append(f"{where}.autoscaling_config.max_replicas ({high}) must be at least 1 and at "
                                f"least min_replicas ({low})")
            if d.get("name") in SINGLE_REPLICA and (low, high) != (1, 1):
                problems.append(f"{where} must run exactly one replica (it is the one writer of every knowledge "
                                "base); use num_replicas: 1, not autoscaling")
            if d.get("name") in ALWAYS_WARM and low < 1:
                problems.append(f"{where}.autoscaling_config.min_replicas must be at least 1: the gateway "
                                "answers /health and /ready and holds requests while a stage cold-starts")
    return problems


def check_serve_config(serve_config: dict[str, Any]) -> None:
    """Validate a whole Serve config before it is deployed: every application's args, the gateway's
    traffic weights, that no stream can outlive a drain, and autoscaling bounds that keep the service's
    promises. Raises `ConfigError` listing every problem."""
    versions = pipeline_configs(serve_config)
    problems = stream_drain_problems(serve_config) + autoscaling_problems(serve_config)
    for app in serve_config["applications"]:
        if is_app(app, GATEWAY_BUILDER):
            gateway = validate(GatewayConfig, app.get("args"), f"args of application {app.get('name')!r}")
            problems += unauthenticated_problems(serve_config, app.get("name"), gateway)
            for deployment in app.get("deployments") or []:
                if deployment.get("name") == GATEWAY_DEPLOYMENT and "user_config" in deployment:
                    traffic = validate(TrafficConfig, deployment["user_config"], "Gateway user_config")
                    missing = sorted(v for v, w in traffic.weights.items() if w > 0 and v not in versions)
                    if missing:
                        problems.append(f"Gateway user_config gives traffic to versions that are not deployed: "
                                        f"{missing}; deployed: {sorted(versions)}")
                    if traffic.shadow and traffic.shadow not in versions:
                        problems.append(f"Gateway user_config copies answers to version {traffic.shadow!r}, which "
                                        f"is not deployed; deployed: {sorted(versions)}")
    roots = {str(c.retrieval.kb_root_path) for c in versions.values()}
    if len(roots) > 1:
        problems.append(f"pipeline versions read knowledge bases from different retrieval.kb_root folders "
                        f"{sorted(roots)}; the knowledge-base API writes to one, so give them the same")
    if problems:
        raise ConfigError("invalid Serve config:\n  " + "\n  ".join(problems))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Serve's HTTP proxy binds 127.0.0.1 when http_options.host is not set.
SERVE_DEFAULT_HTTP_HOST = "127.0.0.1"


def unauthenticated_problems(serve_config: dict[str, Any], name: Any, gateway: GatewayConfig) -> list[str]:
    """A gateway without keys is acceptable only where nobody else can reach it."""
    host = str((serve_config.get("http_options") or {}).get("host") or SERVE_DEFAULT_HTTP_HOST)
    if not gateway.allow_unauthenticated or is_loopback(host):
        return []
    return [f"application {name!r}: allow_unauthenticated is true but http_options.host is {host!r}, which is not "
            "loopback; give the gateway an api_key_file instead, or bind the proxy to 127.0.0.1"]
