"""Every test process: lifecycle events go nowhere unless a test's cluster names its own event file
(`tests.support.service.running_service` does), so no test writes into the repository's `var/`."""

import os
from typing import Any

import pytest

os.environ.setdefault("RAG_LIFECYCLE_EVENTS", "off")

CLUSTER_TESTS = "tests/serve/"  # every test that starts a Ray cluster lives here, and nothing else does
CLUSTER_SCOPE = "cluster"
CLUSTER_WORKER = "gw0"
# The unit-test workers' niceness. The cluster tests are the run's critical path (about 645 s alone) and
# leave part of both cores idle, which the unit tests (about 120 s of CPU) can fill. But Ray runs its
# workers, so every Serve replica, at niceness 15 (its `worker_niceness`): a unit worker at 0 outweighed
# each of them about 28 to 1 and slowed every cluster test it overlapped. At 19 it yields to them.
UNIT_WORKER_NICENESS = 19


@pytest.hookimpl(tryfirst=True)  # ahead of xdist's own choice of scheduler
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` runs two workers (`-n 2`): all cluster tests go to worker gw0 as a single unit, first,
    in file order, so one Ray cluster runs at a time on the demo's 2 cores and the package and module
    clusters are shared as without xdist; the other worker runs the tests that need no cluster, a module
    at a time (gw0 joins in once its clusters are done). (xdist's `loadgroup` cannot do this on pytest 9:
    its group suffix on node ids no longer takes.)"""
    from xdist.scheduler import LoadScopeScheduling

    class OneClusterWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return CLUSTER_SCOPE if nodeid.startswith(CLUSTER_TESTS) else super()._split_scope(nodeid)

        def _assign_work_unit(self, node: Any) -> None:
            if CLUSTER_SCOPE in self.workqueue:
                if node.gateway.id == CLUSTER_WORKER:
                    self.workqueue.move_to_end(CLUSTER_SCOPE, last=False)
                elif len(self.workqueue) == 1:
                    return  # the cluster unit waits for its worker
                else:
                    self.workqueue.move_to_end(CLUSTER_SCOPE, last=True)
            super()._assign_work_unit(node)

    return OneClusterWorker(config, log)


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and worker != CLUSTER_WORKER:
        os.nice(UNIT_WORKER_NICENESS)  # and every process this worker starts, as children inherit it
