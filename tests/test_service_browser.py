"""The viewer page in a real headless browser (Debian's chromium, driven by Selenium).

Frames appear (the <img> gets decoded pixels, the epoch and chunk counters
move), the prompt box posts a prompt update, and the cut button moves the epoch
to the one the API announced. ``.ci/run`` installs chromium and its driver when
missing; outside CI the test is skipped without them, in CI it fails.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
from service_helpers import service_config, start_service

pytestmark = pytest.mark.timeout(180)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _require_browser() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    message = "Debian chromium and chromium-driver are not installed (.ci/run installs them)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _wait(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_viewer_page_shows_frames_and_its_cut_button_moves_the_epoch(tmp_path):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    svc = start_service(tmp_path / "serve", service_config(), args=["--prompt", "a quiet harbour"])
    driver = None
    try:
        options = Options()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--user-data-dir={tmp_path / 'chromium'}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(30)
        driver.get(svc.url + "/")
        text = lambda id_: driver.find_element(By.ID, id_).text  # noqa: E731

        # Frames appear: the image holds decoded pixels and the counters follow the stream.
        _wait(lambda: driver.execute_script(
            "const i = document.getElementById('frame'); return i.complete && i.naturalWidth > 0;"),
            60, "a frame in the <img>")
        first_chunk = int(_wait(lambda: text("chunk").isdigit() and text("chunk"), 30, "chunk counter"))
        _wait(lambda: int(text("chunk")) > first_chunk, 30, "the chunk counter to move")
        epoch = int(text("epoch"))
        _wait(lambda: '"ready": true' in text("status"), 30, "the status panel")

        # The prompt box posts a prompt update and shows where it applies.
        driver.find_element(By.ID, "prompt").send_keys("a storm rolls in")
        driver.find_element(By.ID, "send-prompt").click()
        _wait(lambda: "prompt_update applies at chunk" in text("last"), 15, "the prompt answer")

        # The cut button: the announced epoch is the one the frames then show.
        driver.find_element(By.ID, "cut").click()
        answer = _wait(lambda: "hard_cut applies at chunk" in text("last") and text("last"), 15, "the cut answer")
        announced = int(answer.rsplit("epoch ", 1)[1])
        assert announced == epoch + 1
        _wait(lambda: int(text("epoch")) == announced, 30, f"frames of epoch {announced}")
        assert text("err") == ""

        # POST /v1/shutdown drains like SIGTERM: the service exits 0 on its own.
        driver.execute_script("fetch('/v1/shutdown', {method: 'POST', body: '{}'});")
        assert svc.proc.wait(60) == 0, svc.output()
    finally:
        if driver is not None:
            driver.quit()
        assert svc.stop() == 0, svc.output()
