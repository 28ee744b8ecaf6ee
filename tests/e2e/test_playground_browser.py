"""The web playground in a real browser: Debian's headless Chromium, driven through chromedriver
by selenium, against the real `tokenmill serve` of the e2e session. It loads, takes the API key,
sends a message, and shows the streamed reply; a screenshot is saved under the test's tmp_path.

Without Chromium the test is skipped, except under CI (`CI=true`), where `.ci/run` installs it and
a missing browser is a failure."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import API_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
QUESTION = "Name a color."
MAX_TOKENS = 24


def _browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        message = "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # The network log names the chat request, whose streamed body the test reads back over CDP.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    # The driver is given by path, so selenium never looks one up on the network.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def test_playground_streams_a_reply_in_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(tmp_path)
    try:
        driver.get(server.url + "/")
        assert driver.title == "tokenmill playground"
        driver.find_element(By.ID, "api_key").send_keys(API_KEY)
        driver.execute_script("document.getElementById('api_key').dispatchEvent(new Event('change'))")
        WebDriverWait(driver, 30).until(lambda d: "SmolLM2" in d.find_element(By.ID, "model").text)
        for field, value in (("temperature", "0"), ("max_tokens", str(MAX_TOKENS))):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        driver.execute_cdp_cmd("Network.enable", {})
        driver.find_element(By.ID, "prompt").send_keys(QUESTION)
        driver.find_element(By.ID, "send").click()

        def finished(d):
            bubbles = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            return bubbles and bubbles[-1].get_attribute("data-state") in ("done", "error")
        WebDriverWait(driver, 180).until(finished)
        bubble = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        driver.save_screenshot(str(tmp_path / "playground.png"))
        assert bubble.get_attribute("data-state") == "done", driver.find_element(By.ID, "log").text
        shown = bubble.find_element(By.CSS_SELECTOR, "span").text
        chunks = int(bubble.get_attribute("data-chunks"))
        # The live metrics panel has read /metrics with the key: tokens were generated.
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "m-gen-total").text not in ("–", "0"))
        streamed = _streamed_chat_body(driver)
    finally:
        driver.quit()
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    assert chunks > 1  # streamed: the text grew piece by piece
    # What the page shows is exactly the text of the server's SSE stream, as the browser received it.
    request, events = streamed
    assert request["stream"] is True and request["temperature"] == 0 and request["max_tokens"] == MAX_TOKENS
    assert request["messages"] == [{"role": "user", "content": QUESTION}]
    deltas = [e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")]
    usage = [e["usage"] for e in events if e.get("usage")]
    assert shown and shown == "".join(deltas).strip()
    assert usage and usage[0]["completion_tokens"] <= MAX_TOKENS


def _streamed_chat_body(driver) -> tuple[dict, list[dict]]:
    """The chat request the page sent and the SSE events it got, from Chromium's network log."""
    request_id = posted = None
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent" and \
                params["request"]["url"].endswith("/v1/chat/completions"):
            request_id = params["requestId"]
            posted = json.loads(params["request"]["postData"])
    assert request_id is not None, "the page sent no chat request"
    body = driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": request_id})["body"]
    events = [json.loads(line[6:]) for line in body.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    return posted, events
