"""Every test process: lifecycle events go nowhere unless a test's cluster names its own event file
(`tests.support.service.running_service` does), so no test writes into the repository's `var/`."""

import os
from typing import Any

import pytest

os.environ.setdefault("RAG_LIFECYCLE_EVENTS", "off")

CLUSTER_TESTS = "tests/serve/"  # every test that starts a Ray cluster lives here, and nothing else does


@pytest.hookimpl(tryfirst=True)  # ahead of xdist's own choice of scheduler
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` runs two workers (`-n 2`): all cluster tests go to one of them as a single unit, in file
    order, so one Ray cluster runs at a time on the demo's 2 cores and the package and module clusters are
    shared as without xdist; the other worker runs the tests that need no cluster, a module at a time.
    (xdist's `loadgroup` cannot do this on pytest 9: its group suffix on node ids no longer takes.)"""
    from xdist.scheduler import LoadScopeScheduling

    class OneClusterWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "cluster" if nodeid.startswith(CLUSTER_TESTS) else super()._split_scope(nodeid)

    return OneClusterWorker(config, log)
