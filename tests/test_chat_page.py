"""The example app's chat page end to end, in headless Chromium (Debian's package, driven by Playwright).

Logs in, watches the answer arrive token by token, checks that model/user text
is rendered as text (never HTML), presses Stop mid-answer and checks that the
server cancelled the generation, and saves a screenshot as a test artifact
(``test-artifacts/`` or ``$TEST_ARTIFACTS``).
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import requests
from debian import ensure_debian_packages

HERE = os.path.dirname(os.path.abspath(__file__))
ARTIFACTS = os.environ.get("TEST_ARTIFACTS") or os.path.join(os.path.dirname(HERE), "test-artifacts")
KEY = "sk-chat-page-test"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
LAST_ANSWER = "document.querySelector('#transcript li.assistant:last-of-type')"


@pytest.fixture(scope="module")
def chat_server(default_model_dir, tmp_path_factory):
    from servers import gunicorn

    log = str(tmp_path_factory.mktemp("chat-page") / "server.log")
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_API_KEYS": KEY, "LLM_EAGER_LOAD": "1",
           "LLM_KEEPALIVE_SECONDS": "0.5", "APP_USERS": "alice:wonderland"}
    with gunicorn("app_example.wsgi:app", env, log, "/api/ping") as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    ensure_debian_packages(("chromium", "chromium"))
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _generating(server) -> int:
    """Generations the engine is running or has queued (from /readyz) plus open streams (from /metrics)."""
    ready = requests.get(server.base + "/llm/readyz", timeout=10).json()
    text = requests.get(server.base + "/llm/metrics", timeout=10).text
    in_flight = sum(float(v) for v in re.findall(r"^llm_in_flight_requests\{[^}]*\} (\S+)$", text, re.M))
    return ready["running"] + ready["queued"] + int(in_flight)


def _ask(page, text: str, max_tokens: int, temperature: float, min_tokens: int = 0) -> None:
    """Ask through the page's form. ``min_tokens`` (not a field of the page) is added to the request on its way out,
    so the answer is long enough to watch it stream whatever the model writes on this machine."""
    page.unroute("**/llm/v1/chat/completions")
    if min_tokens:
        page.route("**/llm/v1/chat/completions", lambda route: route.continue_(
            post_data=json.dumps({**json.loads(route.request.post_data), "min_tokens": min_tokens})))
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    page.fill("#prompt", text)
    page.click("#send")


def test_chat_page_streams_renders_safely_and_stops(chat_server, browser):
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.goto(chat_server.base + "/chat")
    assert "/login" in page.url  # the page wants the app's own login
    page.fill("#username", "alice")
    page.fill("#password", "wonderland")
    page.click("#login-button")
    page.wait_for_url("**/chat")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    assert page.input_value("#model") == "smollm2"

    # 1. A short answer: tokens arrive one by one (several DOM updates while the answer is still streaming).
    hostile = 'What is the capital of France? <img src=x onerror="window.pwned=1"><b>bold</b>'
    _ask(page, hostile, max_tokens=40, temperature=0, min_tokens=40)
    page.wait_for_function(f"(() => {{ const a = {LAST_ANSWER}; return a && a.dataset.state === 'streaming'"
                           " && Number(a.querySelector('.text').dataset.updates) >= 3; })()", timeout=60_000)
    page.wait_for_function(f"{LAST_ANSWER}.dataset.state === 'done'", timeout=60_000)
    answer = page.text_content("#transcript li.assistant:last-of-type .text")
    assert answer
    updates = int(page.get_attribute("#transcript li.assistant:last-of-type .text", "data-updates"))
    assert updates > 1
    # HTML in the conversation is text, never markup.
    assert page.locator("#transcript img, #transcript b").count() == 0
    assert page.evaluate("window.pwned === undefined")
    assert '<b>bold</b>' in page.text_content("#transcript li.user .text")

    # 2. A long answer, stopped mid-way: the conversation so far goes with it, and the server cancels.
    with page.expect_request("**/llm/v1/chat/completions") as sent:
        _ask(page, "Write a very long story about a dragon who learns to cook.", max_tokens=1500, temperature=0.8, min_tokens=1500)
    body = json.loads(sent.value.post_data)
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"] and body["stream"] is True
    page.wait_for_function(f"Number({LAST_ANSWER}.querySelector('.text').dataset.updates) >= 5", timeout=60_000)
    assert _generating(chat_server) > 0
    page.click("#stop")
    page.wait_for_function(f"{LAST_ANSWER}.dataset.state === 'stopped'", timeout=10_000)
    stopped_text = page.text_content("#transcript li.assistant:last-of-type .text")
    deadline = time.monotonic() + 15
    while _generating(chat_server) != 0:  # 1500 tokens would take a minute; a cancelled one ends at once
        assert time.monotonic() < deadline, "the server did not cancel the stopped generation"
        time.sleep(0.2)
    time.sleep(0.5)
    assert page.text_content("#transcript li.assistant:last-of-type .text") == stopped_text  # nothing more arrives
    assert page.text_content("#status") == "Stopped."
    assert not page.is_disabled("#send") and page.is_disabled("#stop")

    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "chat-page.png"), full_page=True)
    assert os.path.getsize(os.path.join(ARTIFACTS, "chat-page.png")) > 10_000
    page.close()
