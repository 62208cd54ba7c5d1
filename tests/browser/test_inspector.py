"""The inspector in a real browser over real runs (the real pipeline; the model replayed from the
shipped transcript, or the scripted LLM server for a run that is still going)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from django.db import connection
from selenium.webdriver.common.by import By

from agentrunner.runner.pipeline import run_task
from registry import services as registry
from registry.models import Task
from tests.browser.conftest import sign_in, wait_for
from tests.inspector.runs import demo_repository
from tests.llm_server import Reply, tool

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def css(browser, selector: str):
    return browser.driver.find_elements(By.CSS_SELECTOR, selector)


def test_list_and_run_page_show_real_runs_to_their_owner_only(browser, succeeded_run, failed_run, bob):
    sign_in(browser, "alice", "pw-alice-123")
    driver = browser.driver
    badges = {
        row.get_attribute("data-id"): row.find_element(By.CSS_SELECTOR, ".badge").get_attribute("class")
        for row in css(browser, "#run-rows tr.run")
    }
    assert badges == {
        str(succeeded_run.pk): "badge status-succeeded",
        str(failed_run.pk): "badge status-failed",
    }
    green = css(browser, f'tr[data-id="{succeeded_run.pk}"] .badge')[0].value_of_css_property("background-color")
    red = css(browser, f'tr[data-id="{failed_run.pk}"] .badge')[0].value_of_css_property("background-color")
    assert green != red  # the stylesheet is served and colours the badges

    driver.find_element(By.CSS_SELECTOR, f'tr[data-id="{succeeded_run.pk}"] a').click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "timeline"), "the run page")
    phases = [li.get_attribute("data-phase") for li in css(browser, "#timeline .legend li")]
    assert {"allocate", "prepare", "agent", "tests", "commit", "artifacts"} <= set(phases)
    assert len(css(browser, "#timeline svg rect.seg")) == len(phases)
    added = [row.text for row in css(browser, "#diff tr.diff-line.add")]
    removed = [row.text for row in css(browser, "#diff tr.diff-line.del")]
    assert any("return a + b" in line for line in added) and any("return a - b" in line for line in removed)
    tools = [el.text for el in css(browser, "#transcript .tool-name")]
    assert tools == ["read_file", "edit_file", "run_tests", "finish"]
    assert "2 passed in 0.01s" in driver.find_element(By.ID, "test-tail").text
    assert driver.find_element(By.ID, "run-status").text == "succeeded"
    shots = os.environ.get("AGENTRUNNER_SCREENSHOTS")
    if shots:  # how the README's picture is made: AGENTRUNNER_SCREENSHOTS=docs pytest tests/browser
        browser.full_page_screenshot(Path(shots) / "inspector-run.png", max_height=2400)
        driver.set_window_size(1280, 900)

    driver.get(f"{browser.base}/runs/{failed_run.pk}/")
    failing = driver.find_element(By.ID, "first-failure")
    assert failing.text.startswith("FAILED test_calc.py::test_add")
    assert "tl failing" in failing.get_attribute("class")
    tail = driver.find_element(By.ID, "test-tail")
    top = driver.execute_script(
        "return arguments[0].offsetTop - arguments[1].offsetTop - arguments[1].scrollTop", failing, tail
    )
    assert 0 <= top < tail.size["height"]  # the failing line is in view inside the tail box

    sign_in(browser, "bob", "pw-bob-123")
    assert css(browser, "#run-rows tr.run") == []
    driver.get(f"{browser.base}/runs/{succeeded_run.pk}/")
    assert "Not Found" in driver.page_source and not css(browser, "#run-status")


def test_running_task_streams_events_and_cancel_stops_it(browser, llm, alice, tmp_path):
    # The scripted model reads a file, slowly, for ever: the task stays running until cancelled.
    llm.responder = lambda request: Reply(body=tool("read_file", path="calc.py"), delay=0.4)
    task = registry.task_create(
        title="Keeps reading",
        instructions="Read calc.py.",
        repository=demo_repository(tmp_path),
        max_steps=200,
        owner=alice,
    )

    def run() -> None:
        try:
            run_task(task_id=task.pk)
        finally:
            connection.close()  # this thread's own connection: the test database is dropped after

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 20
    while not task.events.filter(type="llm_call").exists():
        assert time.monotonic() < deadline, "the task never reached the model"
        time.sleep(0.1)

    sign_in(browser, "alice", "pw-alice-123")
    # Read the row in one go: the list refreshes its rows while a run is active.
    badge, phase = browser.driver.execute_script(
        "const row = document.querySelector(`tr[data-id='${arguments[0]}']`);"
        "return [row.querySelector('.badge').textContent, row.querySelector('.phase').textContent];",
        str(task.pk),
    )
    assert (badge, phase) == ("running", "agent")
    driver = browser.driver
    driver.get(f"{browser.base}/runs/{task.pk}/")
    assert driver.find_element(By.ID, "run-status").text == "running"
    assert "has been running for" in driver.find_element(By.ID, "no-timings").text
    first_seq = int(driver.find_element(By.ID, "events").get_attribute("data-after"))
    driver.execute_script("window.stillTheSamePage = true;")
    wait_for(
        browser,
        lambda d: any(
            int(li.get_attribute("data-seq")) > first_seq + 2 for li in d.find_elements(By.CSS_SELECTOR, "#events li")
        ),
        "new events to appear",
    )
    assert driver.execute_script("return window.stillTheSamePage === true")  # no reload happened
    seqs = [int(li.get_attribute("data-seq")) for li in css(browser, "#events li")]
    assert seqs == sorted(set(seqs))  # appended once each, in order

    driver.find_element(By.ID, "cancel-btn").click()
    wait_for(
        browser, lambda d: d.find_element(By.ID, "run-status").text == "cancelled", "the page to show cancelled", 30
    )
    runner.join(timeout=30)
    assert not runner.is_alive()
    task.refresh_from_db()
    assert task.status == "cancelled" and task.failure_reason == "cancelled"
    # The page reloads once the run has ended: a cancelled task offers Retry, no more Cancel.
    wait_for(browser, lambda d: d.find_elements(By.ID, "retry-btn"), "the finished page with Retry")
    assert not css(browser, "#cancel-btn")
    assert Task.objects.filter(pk=task.pk, events__type="cancel_requested").exists()
