"""Every test process: lifecycle events go nowhere unless a test's cluster names its own event file
(`tests.support.service.running_service` does), so no test writes into the repository's `var/`."""

import os

os.environ.setdefault("RAG_LIFECYCLE_EVENTS", "off")
