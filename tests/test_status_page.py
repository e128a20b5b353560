"""The status page at ``GET /``: served by the supervisor, and loaded in a real headless Chromium
(Debian's ``chromium`` and ``chromium-driver``) that polls the balancer's /stats.

``FASTLB_SCREENSHOT=docs/status.png`` (relative to the current directory) makes the desktop test
save its screenshot there too, after a minute of traffic so that the charts have something to show.
"""

from __future__ import annotations

import http.client
import importlib.resources
import os
import re
import signal
from pathlib import Path

import psutil
import pytest
from conftest import CLIENT_TIMEOUT, ClientLoop, wait_until

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DESKTOP = (1280, 900)
PHONE = (390, 844)
PAGE_TIMEOUT = 15.0  # a condition on the page; it polls /stats every second
SCREENSHOT_SAMPLES = 60  # polls of traffic before the screenshot asked for by FASTLB_SCREENSHOT
CHECKS = ("--check", "--check-interval", "0.2s", "--fall", "1", "--rise", "1")


def get(port: int, path: str, method: str = "GET") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        response.body = response.read()
        return response
    finally:
        conn.close()


def installed_page() -> bytes:
    return importlib.resources.files("fastlb.web").joinpath("status.html").read_bytes()


# ---- without a browser --------------------------------------------------------------------------


def test_root_answers_the_status_page(balancer):
    lb = balancer(["127.0.0.1:9"])
    page = installed_page()
    response = get(lb.stats_port, "/")
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/html; charset=utf-8"
    assert response.getheader("Cache-Control") == "no-store"
    assert response.body == page
    assert b"<title>fastlb status</title>" in page
    head = get(lb.stats_port, "/", method="HEAD")
    assert (head.status, head.body) == (200, b"")
    assert head.getheader("Content-Length") == str(len(page))
    missing = get(lb.stats_port, "/status.html")
    assert missing.status == 404
    assert missing.body == b"not found; try /, /stats or /metrics\n"


def test_page_is_self_contained_and_inserts_text_only():
    page = installed_page().decode()
    # Nothing fetched from elsewhere: no absolute URL, no linked script, stylesheet or image.
    assert not re.search(r"https?://|//[\w.-]+\.\w", page)
    assert not re.search(r"<link\b|\bsrc\s*=|@import|url\(", page)
    assert 'new URL("stats", location.href)' in page
    # Addresses and reasons go in as text nodes: nothing is ever parsed as markup.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in page


# ---- in Chromium --------------------------------------------------------------------------------


class StatusPage:
    """A Chromium window on one balancer's status page."""

    def __init__(self, driver):
        self.driver = driver

    def open(self, stats_port: int) -> None:
        self.driver.get(f"http://127.0.0.1:{stats_port}/")

    def wait(self, condition, what: str, timeout: float = PAGE_TIMEOUT):
        """Waits for ``condition()`` to return something true, which is returned."""
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
                lambda driver: condition()
            )
        except TimeoutException:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; the page reads:\n"
                + self.driver.find_element(By.TAG_NAME, "body").text
            ) from None

    def cell(self, address: str, field: str):
        selector = f'tr[data-backend="{address}"] [data-field="{field}"]'
        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def text(self, address: str, field: str) -> str:
        try:
            return self.cell(address, field).text
        except NoSuchElementException:
            return ""

    def number(self, address: str, field: str) -> float | None:
        """The raw value behind a number cell (None while the page has none, e.g. a rate
        before the second poll)."""
        try:
            value = self.cell(address, field).get_attribute("data-value")
        except NoSuchElementException:
            return None
        return float(value) if value else None

    def script(self, source: str, *arguments):
        return self.driver.execute_script(source, *arguments)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """A headless Chromium under chromedriver, for the tests of this file; killed at the end."""
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install selenium)")
    for program, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(program, os.X_OK):
            pytest.skip(f"{program} is missing (apt-get install {package})")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        # Loopback only: no name resolves, and none of the browser's own services call home.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    processes = [psutil.Process(driver.service.process.pid)]
    processes += processes[0].children(recursive=True)
    try:
        yield driver
    finally:
        driver.quit()

        def alive():
            running = []
            for process in processes:
                try:
                    if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                        running.append(process)
                except psutil.NoSuchProcess:
                    pass
            return running

        try:
            wait_until(lambda: not alive(), 10.0, "chromium and chromedriver to exit")
        except AssertionError:
            for process in alive():
                process.kill()


@pytest.fixture
def page(chromium):
    chromium.set_window_size(*DESKTOP)
    yield StatusPage(chromium)
    chromium.get("about:blank")  # stops the polling before the balancer goes


def test_page_follows_traffic_and_a_backend_going_down(page, backends, balancer, tmp_path):
    a, b = backends("name", name="a"), backends("name", name="b")
    lb = balancer([a, b], *CHECKS)
    page.open(lb.stats_port)
    assert page.driver.title == "fastlb status"
    page.wait(
        lambda: page.text(a.address, "state") == page.text(b.address, "state") == "up",
        "both backends up on the page",
    )
    assert page.driver.find_element(By.ID, "pid").text == str(lb.pid)
    assert page.driver.find_element(By.ID, "workers").text == "1/1 ready"
    pool = page.driver.find_element(By.CSS_SELECTOR, '[data-pool="default"]')
    assert "roundrobin" in pool.find_element(By.CSS_SELECTOR, '[data-field="algorithm"]').text
    assert pool.find_element(By.CSS_SELECTOR, '[data-field="check"]').text == "check tcp"

    with ClientLoop(lb, threads=2):
        first = page.wait(lambda: page.number(a.address, "connections"), "a's first connections")
        page.wait(
            lambda: page.number(a.address, "connections") > first,
            f"a's total connections to grow past {first:g}",
        )
        page.wait(lambda: page.number(a.address, "rate"), "a's connections/s")
        assert re.fullmatch(r"[\d,]+(\.\d)?", page.text(a.address, "rate"))
        assert re.fullmatch(r"[\d.]+ (B|KiB|MiB)/s", page.text(a.address, "out_rate"))
        frontend_rate = page.driver.find_element(
            By.CSS_SELECTOR, '[data-frontend="default"] [data-field="rate"]'
        )
        assert float(frontend_rate.get_attribute("data-value")) > 0
        assert "ok" in page.text(a.address, "check")

        b.kill()
        page.wait(lambda: page.text(b.address, "state") == "down", "b down on the page")
        assert page.text(a.address, "state") == "up"
        page.wait(lambda: page.text(b.address, "check").startswith("fail"), "b's failed check")
        # The transitions open on a click, and stay open while the page updates.
        page.cell(b.address, "transitions").find_element(By.TAG_NAME, "summary").click()
        reason = lb.backend(b)["history"]["transitions"][-1]["reason"]
        assert f"up → down\n{reason}" in page.text(b.address, "transitions")
        total = page.number(a.address, "connections")
        page.wait(lambda: page.number(a.address, "connections") > total, "the next poll")
        details = page.cell(b.address, "transitions").find_element(By.TAG_NAME, "details")
        assert details.get_attribute("open") is not None
        assert page.driver.find_elements(By.CSS_SELECTOR, "#chart-connections path.line")
        assert page.driver.find_elements(By.CSS_SELECTOR, "#chart-bytes path.line")

        assert page.driver.save_screenshot(str(tmp_path / "status.png"))
        wanted = os.environ.get("FASTLB_SCREENSHOT")
        if wanted:
            chart = page.driver.find_element(By.ID, "chart-connections")
            page.wait(
                lambda: int(chart.get_attribute("data-samples")) >= SCREENSHOT_SAMPLES,
                f"{SCREENSHOT_SAMPLES} samples in the charts",
                timeout=PAGE_TIMEOUT + SCREENSHOT_SAMPLES,
            )
            assert page.driver.save_screenshot(str(Path(wanted).resolve())), wanted

    lb.signal(signal.SIGTERM)
    lb.wait_exit()
    banner = page.driver.find_element(By.ID, "banner")
    page.wait(banner.is_displayed, "the banner once the balancer is gone")
    assert banner.text.startswith("Cannot reach the balancer at 127.0.0.1:")


def test_page_shows_what_a_backend_says_as_text(page, backends, balancer):
    # A redis check fails with the server's reply as its reason: here, markup.
    reply = '-ERR <img id="injected" src="x" onerror="document.title=1"> & <b>bold</b>'
    hostile = backends("name", name=reply + "\r")
    lb = balancer([hostile], *CHECKS, "--check-type", "redis")
    page.open(lb.stats_port)
    page.wait(lambda: page.text(hostile.address, "state") == "down", "the backend down")
    page.wait(lambda: reply in page.text(hostile.address, "check"), "the reply as the reason")
    assert page.driver.find_elements(By.ID, "injected") == []
    assert page.cell(hostile.address, "check").find_elements(By.TAG_NAME, "b") == []
    assert page.driver.title == "fastlb status"


def test_page_fits_a_phone(page, backends, balancer, tmp_path):
    a, b = backends("name", name="a"), backends("name", name="b")
    lb = balancer([a, b], *CHECKS)
    width, height = PHONE
    page.driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 2, "mobile": True},
    )
    try:
        page.open(lb.stats_port)
        page.wait(lambda: page.text(b.address, "check").startswith("ok"), "b's first check")
        assert page.script("return innerWidth") == width
        assert page.script("return document.documentElement.scrollWidth") <= width + 1
        # The backends' table is wider than the phone: it scrolls in its own box.
        table_box = page.cell(a.address, "state").find_element(By.XPATH, "ancestor::div[1]")
        assert table_box.get_attribute("class") == "scroll"
        assert page.script("return arguments[0].scrollWidth > arguments[0].clientWidth", table_box)
        page.driver.save_screenshot(str(tmp_path / "status-phone.png"))
    finally:
        page.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
