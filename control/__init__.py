"""The control plane: code that runs outside the cluster and decides about it.

The `serve_config.yaml` document and its checks, preflight (does a version fit), the rollout driver and
its judge, the cluster client (dashboard REST, Ray's CLI, the gateway's probes) and starting or stopping
a local cluster. Plain code with its I/O passed in; no Ray at import time (a test says so), so the
rollout CLI and the unit tests start fast.
"""
