"""The web chat page in real headless Chromium (Debian's chromium + chromium-driver via selenium)."""

from __future__ import annotations

import re
import shutil
import time

import pytest

from tests.serving_helpers import start_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("the web chat test needs Chromium: `apt-get install -y chromium chromium-driver` "
                "(.ci/run installs them when it runs as root)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (in the test extra)")


@pytest.fixture(scope="module")
def server(one_torch_thread):
    from tokenloom import LLM

    llm = LLM("smollm2-135m-instruct")
    running = start_server(llm)
    yield running
    running.stop()
    llm.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=390,844"):
        options.add_argument(flag)  # a phone-width window
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # a phone's viewport
                           {"width": 375, "height": 812, "deviceScaleFactor": 2, "mobile": True})
    yield driver
    driver.quit()


def _wait(predicate, timeout: float = 120.0, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out waiting in the browser")


def _replies(browser):
    return browser.find_elements("css selector", ".msg.assistant")


def _send(browser, text: str) -> None:
    box = browser.find_element("id", "input")
    box.clear()
    box.send_keys(text)
    browser.find_element("id", "send").click()


def test_a_message_gets_a_streamed_reply(server, browser):
    browser.get(server.url + "/")
    assert browser.execute_script("return window.innerWidth") == 375
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 375  # no sideways scrolling
    browser.execute_script("document.getElementById('temperature').value = '0';"
                           "document.getElementById('max_tokens').value = '24';")
    _send(browser, "Name three colors.")
    reply = _wait(lambda: _replies(browser))[-1]
    lengths = set()
    while reply.get_attribute("data-state") == "streaming":
        lengths.add(len(reply.find_element("css selector", ".body").text))
        time.sleep(0.01)
    assert reply.get_attribute("data-state") == "done"
    assert len(lengths - {0}) >= 2  # the text grew while it streamed
    text = reply.find_element("css selector", ".body").text
    expected = server.llm.generate([server.llm.chat_prompt([{"role": "user", "content": "Name three colors."}])],
                                   server.llm.sampling_params(temperature=0, max_tokens=24))[0].text
    # the page renders markdown: list markers and ** become elements, not text
    plain = re.sub(r"(?m)^\s*(\d+\.|[-*])\s+", "", expected).replace("**", "").replace("`", "")
    assert " ".join(text.split()) == " ".join(plain.split())
    assert "tok/s" in reply.find_element("css selector", ".stats").text
    # the second turn carries the history
    _send(browser, "And one more?")
    _wait(lambda: len(_replies(browser)) == 2 and _replies(browser)[-1].get_attribute("data-state") == "done")


def test_model_output_is_never_injected_as_html(server, browser):
    html = browser.execute_script("return renderMarkdown('<img src=x onerror=alert(1)> **bold** `a<b`')")
    assert "<img" not in html and "&lt;img" in html
    assert "<strong>bold</strong>" in html and "<code>a&lt;b</code>" in html
    code = browser.execute_script("return renderMarkdown('```python\\nprint(\"<b>\")\\n```')")
    assert code.startswith("<pre><code>") and "&lt;b&gt;" in code


def test_the_stop_button_ends_a_long_reply_and_frees_its_request(server, browser):
    browser.execute_script("window.tokenloomExtraParams = {ignore_eos: true};"
                           "document.getElementById('max_tokens').value = '2000';")
    _send(browser, "Tell me a very long story.")
    reply = _wait(lambda: [r for r in _replies(browser) if r.get_attribute("data-state") == "streaming"])[-1]
    _wait(lambda: len(reply.find_element("css selector", ".body").text) > 10)
    assert server.engine.stats.num_running == 1
    browser.find_element("id", "stop").click()
    _wait(lambda: reply.get_attribute("data-state") == "stopped")
    assert server.idle(timeout=10)  # aborted: no request left, every KV block free
    assert "stopped" in reply.find_element("css selector", ".stats").text
