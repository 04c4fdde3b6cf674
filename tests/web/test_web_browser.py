"""The web page in a real headless Chromium: upload, vocabulary, Segment, result; a bad request.

Needs Gradio and selenium (``pip install -e ".[test,web]"``) and Debian's ``chromium`` +
``chromium-driver`` (``.ci/run`` installs them with apt-get); skips and says which is missing.
The page after segmentation is saved as ``web_demo.png`` in the test's folder (the README's
``docs/web_demo.png``).
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator

import pytest

from tests.web.conftest import TINY_DENSE_CLIP

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("Chromium or chromedriver not found: apt-get install chromium chromium-driver "
                "(as .ci/run does) to run the browser tests", allow_module_level=True)
pytest.importorskip("gradio", reason='the web demo needs Gradio: pip install -e ".[web]"')
pytest.importorskip("selenium", reason='the browser tests need selenium: pip install -e ".[test]"')

from selenium import webdriver  # noqa: E402 - after the skips above
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# the tiny model answers in about a second; the first request also builds it
WAIT_SECONDS = 60
WINDOW = (1400, 1500)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(web) -> Iterator[str]:
    """The page of the tiny dense CLIP config, served on a free port of 127.0.0.1."""
    demo = web.WebDemo()
    app = web.build_app(demo, web.list_configs(), TINY_DENSE_CLIP)
    port = _free_port()
    web.launch(app, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()
    demo.close()


@pytest.fixture(scope="module")
def browser(page_url) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open(browser, url: str) -> WebDriverWait:
    browser.get(url)
    wait = WebDriverWait(browser, WAIT_SECONDS)
    wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#segment"))
    return wait


def _status(browser) -> str:
    return browser.find_element(By.ID, "status").text


def test_segment_shows_the_overlay_and_the_area_of_every_class(browser, page_url, photo_file,
                                                                 tmp_path):
    wait = _open(browser, page_url)
    browser.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(
        str(photo_file))
    wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#input-image img"))
    browser.find_element(By.CSS_SELECTOR, "#vocabulary textarea").send_keys(
        "cat, wall; background, floor")
    browser.find_element(By.ID, "segment").click()

    wait.until(lambda page: "Segmented" in _status(page) or "Error" in _status(page))
    assert _status(browser).startswith("Segmented cat.png"), _status(browser)
    overlay = wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#overlay img"))
    assert overlay[0].get_attribute("src")
    wait.until(lambda page: page.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", overlay[0]))
    areas = browser.find_element(By.ID, "areas").text
    for name in ("cat", "wall", "floor"):
        assert name in areas
    assert "image encoder" in browser.find_element(By.ID, "timing").text

    screenshot = tmp_path / "web_demo.png"
    browser.save_screenshot(str(screenshot))
    print(f"page after segmentation: {screenshot}")
    assert screenshot.stat().st_size > 0


def test_an_empty_vocabulary_shows_a_message_not_a_traceback(browser, page_url):
    wait = _open(browser, page_url)
    browser.find_element(By.ID, "segment").click()
    wait.until(lambda page: "Error" in _status(page))
    assert "the vocabulary is empty" in _status(browser)
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
