"""Browser tests: Debian's Chromium through Selenium against pytest-django's live server.

A failing test saves a screenshot of the page it was on (and its HTML) to
``$AGENTRUNNER_BROWSER_FAILURES`` (default: a folder under the system temp dir) and prints where.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest

from tests.browser.driver import Browser, browser_available
from tests.conftest import require_service
from tests.inspector.conftest import alice, bob, failed_run, succeeded_run  # noqa: F401 (shared fixtures)
from tests.runner.conftest import llm  # noqa: F401 (the scripted model server)

FAILURES = Path(os.environ.get("AGENTRUNNER_BROWSER_FAILURES") or Path(tempfile.gettempdir()) / "agentrunner-browser")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    browser = item.funcargs.get("browser")
    if browser is None:
        return
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)[-150:]
    try:
        FAILURES.mkdir(parents=True, exist_ok=True)
        shot = FAILURES / f"{name}.png"
        browser.driver.save_screenshot(str(shot))
        (FAILURES / f"{name}.html").write_text(browser.driver.page_source)
        report.sections.append(
            ("browser", f"screenshot of the failing page: {shot}\npage source: {shot.with_suffix('.html')}")
        )
    except Exception as exc:  # the browser itself may be what broke
        report.sections.append(("browser", f"could not save a screenshot: {type(exc).__name__}: {exc}"))


@pytest.fixture(scope="session")
def _chromium():
    available, how = browser_available()
    require_service("Chromium", available, how)
    browser = Browser()
    yield browser
    browser.quit()


@pytest.fixture
def browser(_chromium, live_server):
    """The session's browser, signed out, at its default size, with helpers bound to the server."""
    driver = _chromium.driver
    driver.delete_all_cookies()
    driver.set_window_size(1280, 900)
    _chromium.base = live_server.url
    return _chromium


def sign_in(browser, username: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    driver = browser.driver
    driver.delete_all_cookies()
    driver.get(f"{browser.base}/accounts/login/")
    driver.find_element(By.ID, "id_username").send_keys(username)
    driver.find_element(By.ID, "id_password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit].primary").click()
    wait_for(browser, lambda d: d.current_url.endswith("/runs/"), "the run list after signing in")


def wait_for(browser, condition, what: str, timeout: float = 15):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    # A page that refreshes or navigates (after a form post, say) replaces its elements between
    # finding one and reading it (stale element, "node does not belong to the document"): look
    # again rather than fail; a condition that never holds still ends in the timeout.
    ignored = (WebDriverException,)
    wait = WebDriverWait(browser.driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored)
    return wait.until(condition, f"timed out waiting for {what}")
