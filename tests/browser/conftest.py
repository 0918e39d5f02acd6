"""Fixtures of the browser tests: one ``nijimi serve`` subprocess (embedded model, free port, its own output folder)
and one headless system Chromium for the session, a fresh tab per test, and a screenshot of each test's end state in
``$NIJIMI_TEST_OUTPUT/browser/`` (default: the test's temporary folder). Without Playwright or Chromium every test
fails with one line saying what to install (see :mod:`browser.studio`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser.studio import launch, missing_browser, open_page, start_server, stop_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``(url, output folder)`` of a running ``nijimi serve``."""
    output = tmp_path_factory.mktemp("studio") / "outputs"
    process, url = start_server(output)
    yield url, output
    stop_server(process)


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    why = missing_browser()
    if why is not None:
        pytest.fail(f"the browser tests need a browser: {why}", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = launch(playwright, tmp_path_factory.mktemp("chromium-profile"))
        context.set_default_timeout(30_000)
        yield context
        context.close()


@pytest.fixture
def page(browser, server, request, tmp_path):
    """A tab on the page; its end state is saved as ``<test name>.png`` however the test ends."""
    tab = open_page(browser, server[0])
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    folder = Path(os.environ["NIJIMI_TEST_OUTPUT"]) / "browser" if os.environ.get("NIJIMI_TEST_OUTPUT") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(folder / f"{request.node.name}.png"), full_page=True)
    tab.close()
    assert errors == [], f"the page raised: {errors}"
