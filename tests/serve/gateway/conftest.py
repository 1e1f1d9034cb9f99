"""One cluster for the gateway's tests (API, knowledge bases, console, two versions side by side): a
package-scoped fixture, so the modules here share it and it stops before the other cluster tests start
theirs. A module that changes the cluster puts it back before it ends, so the modules run in any order."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.service import LocalService, running_service


@pytest.fixture(scope="package")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    with running_service(tmp_path_factory.mktemp("cluster")) as local:
        yield local


@pytest.fixture
def http(service: LocalService) -> Iterator[httpx.Client]:
    with service.client(timeout=60) as client:
        yield client
