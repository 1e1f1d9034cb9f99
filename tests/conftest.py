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
            # Only while gw0 is there to take it: with nothing but cluster tests selected, xdist may
            # shut gw0 down as a worker without work, and then another worker runs them.
            if CLUSTER_SCOPE in self.workqueue and any(
                    n.gateway.id == CLUSTER_WORKER and not n.shutting_down for n in self.nodes):
                if node.gateway.id == CLUSTER_WORKER:
                    self.workqueue.move_to_end(CLUSTER_SCOPE, last=False)
                elif len(self.workqueue) == 1:
                    return  # the cluster unit waits for its worker
                else:
                    self.workqueue.move_to_end(CLUSTER_SCOPE, last=True)
            super()._assign_work_unit(node)

    return OneClusterWorker(config, log)


_niced = False


def pytest_runtest_setup(item: pytest.Item) -> None:
    """In a run with cluster tests, a worker other than gw0 lowers its priority at its first test that
    needs no cluster (and so does every process it starts after, as children inherit it); a worker that
    runs cluster tests never does, nor any worker of a run without them."""
    global _niced
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if _niced or not worker or worker == CLUSTER_WORKER or item.nodeid.startswith(CLUSTER_TESTS):
        return
    _niced = True
    if any(selected.nodeid.startswith(CLUSTER_TESTS) for selected in item.session.items):
        os.nice(UNIT_WORKER_NICENESS)
