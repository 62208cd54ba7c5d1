"""Debian's Chromium under Selenium, headless, with a fresh profile; never a downloaded browser."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CHROMIUM = os.environ.get("AGENTRUNNER_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("AGENTRUNNER_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browser_available() -> tuple[bool, str]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return False, f"{path} is missing: apt-get install -y chromium chromium-driver (.ci/run does)"
    return True, ""


class Browser:
    """A Chrome WebDriver session and the profile folder it owns."""

    def __init__(self, *, width: int = 1280, height: int = 900):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="ar-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_argument(f"--window-size={width},{height}")
        # Selenium Manager must not look for (or download) a driver: name Debian's.
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def full_page_screenshot(self, path: Path, *, max_height: int = 4000) -> Path:
        """The whole page (up to ``max_height`` px) as PNG: resize the window to the document."""
        driver = self.driver
        width = driver.execute_script("return document.documentElement.scrollWidth")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(max(width, 1280), min(height + 120, max_height))
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
        return path
