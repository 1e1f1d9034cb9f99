"""The cluster tests: every Ray process they start (in-process nodes, replicas) inherits this environment."""

import os

from tests.support.service import CLUSTER_ENV

os.environ.update(CLUSTER_ENV)
