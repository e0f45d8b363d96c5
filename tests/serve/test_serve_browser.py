"""The chat page in a real headless Chromium, driven by Playwright, against a real server."""

from __future__ import annotations

import os
import shutil

import pytest

from scribelm.serve.api import create_app
from scribelm.serve.engine import ModelPool
from tests.serving import ServerThread, save_tiny_models, wait_until

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")
CHROMIUM = os.environ.get("SCRIBE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="the browser test needs Debian's chromium (apt-get install chromium)"),
]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    paths = save_tiny_models(tmp_path_factory.mktemp("browser-models"), tokenizer, context_length=4096, text_only=True)
    pool = ModelPool(paths, max_batch=4, max_queue=8)
    with ServerThread(create_app(pool)) as running:
        yield running


@pytest.fixture()
def page(server, tmp_path):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 800},
        )
        try:
            page = context.new_page()
            page.goto(server.url + "/")
            yield page
        finally:
            context.close()


def assistant(page, n):
    return page.locator(".msg.assistant").nth(n)


def test_chat_page_streams_stops_and_switches_model(server, page):
    pool = server.app.state.pool
    page.wait_for_function("document.querySelectorAll('#model option').length === 2")
    assert page.locator("#model option").all_inner_texts() == ["alpha", "beta"]
    page.fill("#system", "Answer briefly.")
    page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
    page.fill("#max-tokens", "60")
    # 1. type a message, get an answer with its token count and speed
    page.fill("#prompt", "It was the best of times")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=30_000)
    first = assistant(page, 0)
    answer = first.locator(".content").inner_text()
    assert answer.strip()
    meta = first.locator(".meta").inner_text()
    assert "alpha" in meta and "60 tokens" in meta and "tok/s" in meta

    # 2. a long answer streams in (its text grows while it is still streaming); stop it:
    #    the page marks it stopped and the server frees the slot
    page.fill("#max-tokens", "3000")
    page.fill("#prompt", "Tell me a very long story")
    page.click("#send")
    streaming = ".msg.assistant[data-state=streaming] .content"
    page.wait_for_function(f"(document.querySelector('{streaming}') || {{}}).textContent?.length > 0")
    shown = page.evaluate(f"document.querySelector('{streaming}').textContent.length")
    page.wait_for_function(f"(document.querySelector('{streaming}') || {{}}).textContent?.length > {shown}")
    assert page.locator("#stop").is_visible(), assistant(page, 1).inner_text()
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]")
    assert "stopped" in assistant(page, 1).locator(".meta").inner_text()
    assert page.locator("#send").is_visible()
    assert wait_until(lambda: pool.engines["alpha"].active_count == 0, timeout=10)
    assert pool.engines["alpha"].generated_tokens < 2500  # it really stopped early

    # 3. switch model and talk to the other one
    page.fill("#max-tokens", "20")
    page.select_option("#model", "beta")
    page.fill("#prompt", "Call me Ishmael")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length === 2", timeout=30_000)
    third = assistant(page, 2)
    assert "beta" in third.locator(".meta").inner_text() and third.locator(".content").inner_text().strip()
    assert "beta" in pool.engines

    # 4. the conversation stays in the browser
    page.reload()
    page.wait_for_function("document.querySelectorAll('.msg').length === 6")
    assert assistant(page, 0).locator(".content").inner_text() == answer
    if os.environ.get("SCRIBE_SCREENSHOT"):
        page.screenshot(path=os.environ["SCRIBE_SCREENSHOT"], full_page=True)
