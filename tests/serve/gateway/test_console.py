"""The web console at `/` in a real browser: Debian's headless Chromium driven through its ChromeDriver
(nothing downloads a browser), against the live gateway of this package's cluster. Screenshots land in
`var/test-artifacts/`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control import cluster
from tests.support.service import REPO, LocalService

pytestmark = pytest.mark.cluster
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = REPO / "var" / "test-artifacts"
# The flags that keep Chromium off the network it cannot reach here (updates, sync, field trials).
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900"]

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    if os.environ.get("RAG_REQUIRE_BROWSER"):
        raise RuntimeError("RAG_REQUIRE_BROWSER is set but Chromium is missing: make browser installs it")
    pytest.skip("Debian's chromium and chromium-driver are not installed (make browser)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _testid(driver: Any, name: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def _texts(driver: Any, name: str) -> list[str]:
    return [e.text for e in _testid(driver, name)]


def _wait(driver: Any, condition: Callable[[], Any], timeout_s: float = 30) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The console re-renders its tables on every poll, so an element found a moment ago may be gone: look again.
    return WebDriverWait(driver, timeout_s, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,)).until(lambda _: condition())


@pytest.fixture(scope="module")
def page(browser: Any, service: LocalService) -> Any:
    """The console with the key entered once (then kept in localStorage)."""
    browser.get(f"{service.gateway}/")
    key = _wait(browser, lambda: [e for e in _testid(browser, "api-key") if e.is_displayed()])[0]
    key.send_keys(service.api_key)
    _testid(browser, "api-key-save")[0].click()
    _wait(browser, lambda: not any(e.is_displayed() for e in _testid(browser, "api-key")))
    return browser


def test_the_page_and_its_assets_are_public_and_the_api_behind_it_is_not(service: LocalService) -> None:
    assert httpx.get(f"{service.gateway}/").status_code == 200
    assert httpx.get(f"{service.gateway}/console/console.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{service.gateway}/console/../openapi.json").status_code in (401, 404)
    assert httpx.get(f"{service.gateway}/rollout").status_code == 401


def test_a_chat_streams_an_answer_with_its_sources(page: Any) -> None:
    _testid(page, "tab-chat")[0].click()
    _wait(page, lambda: _testid(page, "chat-input")[0].is_displayed())
    # The knowledge bases are listed by a request of their own: a question sent before has no KB to ask.
    _wait(page, lambda: _testid(page, "kb-select")[0].find_elements("css selector", "option"))
    _testid(page, "chat-input")[0].send_keys("How do I stop the service?")
    _testid(page, "chat-send")[0].click()
    # The package's first chat, possibly while the other xdist worker still runs the unit tests: a
    # generous wait, not a latency check. An answer that ended in an error says so here, not as a timeout.
    answer = _wait(page, lambda: [a for a in _testid(page, "answer")
                                  if a.get_attribute("data-state") in ("done", "error")], 90)[-1]
    assert answer.get_attribute("data-state") == "done", answer.text
    sources = [s.text for s in _testid(page, "source")]
    assert sources and any("operations.md" in s for s in sources), sources
    assert "make stop" in answer.text
    meta = _testid(page, "answer-meta")[-1].text
    assert "v1" in meta and "first token" in meta, meta
    page.save_screenshot(str(ARTIFACTS / "console-chat.png"))
    errors = [e for e in page.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
    assert not errors, errors


def test_two_uploaded_files_appear_in_the_table_and_in_search(page: Any, service: LocalService,
                                                              tmp_path: Path) -> None:
    with service.client(timeout=60) as http:
        assert http.post("/knowledge_base/create_knowledge_base",
                         json={"knowledge_base_name": "console", "kb_info": "made for the browser test"}).is_success
    files = {"lighthouse.md": "# Lighthouses\n\nA lighthouse keeper trims the wick at dusk and logs passing ships.",
             "glacier.txt": "Glaciers carve U-shaped valleys; moraines mark where the ice stopped."}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    _testid(page, "tab-knowledge")[0].click()
    _wait(page, lambda: [r.click() or True for r in _testid(page, "kb-row") if "console" in r.text][:1])
    _wait(page, lambda: _testid(page, "upload-input"))
    _testid(page, "upload-input")[0].send_keys("\n".join(str(tmp_path / name) for name in files))
    if _testid(page, "upload-button"):
        _testid(page, "upload-button")[0].click()
    _wait(page, lambda: {n for n in files if any(n in r for r in _texts(page, "file-row"))} == set(files), 90)
    _testid(page, "search-input")[0].send_keys("who trims the wick")
    # The table shows the job done; the Retrievers pick the new KB up within refresh_interval_s (1 s).
    results = _wait(page, lambda: _search_results(page), 30)
    assert "lighthouse.md" in results[0].text
    page.save_screenshot(str(ARTIFACTS / "console-knowledge.png"))


def _search_results(page: Any) -> list[Any]:
    _testid(page, "search-button")[0].click()
    time.sleep(0.5)
    return _testid(page, "search-result")


def test_the_versions_tab_follows_a_weight_change_live(page: Any, service: LocalService) -> None:
    _testid(page, "tab-versions")[0].click()
    row = _wait(page, lambda: [r for r in _texts(page, "version-row") if "v1" in r])[0]
    assert "100" in row
    # Running replicas per stage, as the autoscaler has them (one each on an idle demo).
    replicas = _wait(page, lambda: [c for c in _texts(page, "version-replicas") if "Generator" in c])[0]
    assert all(f"{stage} " in replicas for stage in ("Embedder", "Generator", "Pipeline", "Retriever")), replicas
    half = service.config("half.yaml", traffic={"weights": {"v1": 50}})
    try:
        cluster.deploy(half, dashboard=service.dashboard)  # weights only: reconfigure, no restart
        _wait(page, lambda: any("v1" in r and "50" in r for r in _texts(page, "version-row")), 30)
        page.save_screenshot(str(ARTIFACTS / "console-versions.png"))
    finally:
        cluster.deploy(service.config_path, dashboard=service.dashboard)
    _wait(page, lambda: any("v1" in r and "100" in r for r in _texts(page, "version-row")), 30)
