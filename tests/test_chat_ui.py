"""services.chat_ui: its OpenAI-client calls through the gateway, and the Streamlit page in headless Chromium
(Debian's /usr/bin/chromium driven by Playwright): pick settings, type a message, watch the answer stream in.

The browser test skips, saying why, without chromium or playwright (`make browser` installs both). Set
TULPAR_UPDATE_DOCS_IMG=1 to refresh docs/img/chat_ui.png from its screenshot.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from services.chat_ui import client as chat
from services.gateway import Gateway, load_gateway_config
from services.gateway.config import AliasConfig
from tests.fake_openai import FakeUpstream, ServerThread

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("TULPAR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "ui-test-key-" + "0123456789abcdef" * 2


@pytest.fixture(scope="module")
def upstream():
    fake = FakeUpstream(models=["tulpar-tiny-v1"])
    with ServerThread(fake.app) as server:
        fake.url = server.url
        yield fake


@pytest.fixture(scope="module")
def gateway_url(upstream):
    mp = pytest.MonkeyPatch()
    mp.setenv("UI_TEST_KEYS", f"ui: 'sha256:{hashlib.sha256(KEY.encode()).hexdigest()}'")
    cfg = load_gateway_config(None, [f"upstream.base_url={upstream.url}/v1", "auth.keys_env=UI_TEST_KEYS"])
    cfg.aliases = {"tulpar-tiny": AliasConfig(targets=[{"model": "tulpar-tiny-v1"}])}
    try:
        with ServerThread(Gateway(cfg).app) as server:
            yield f"{server.url}/v1"
    finally:
        mp.undo()


def test_client_streams_through_the_gateway(gateway_url, upstream):
    client = chat.make_client(gateway_url, KEY)
    assert chat.list_models(client) == ["tulpar-tiny", "tulpar-tiny-v1"]
    history = [{"role": "user", "content": "Сәлем"}]
    msgs = chat.build_messages(history, "  Be brief.  ")
    assert msgs == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Сәлем"}]
    pieces = list(chat.stream_reply(client, "tulpar-tiny", msgs, temperature=0.3, top_p=0.9, max_tokens=32))
    assert len(pieces) > 1 and "".join(pieces) == "Hello from tulpar-tiny-v1! You said: Сәлем"
    sent = upstream.requests[-1]["body"]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["stream"]) == (0.3, 0.9, 32, True)


def test_client_errors_are_one_line(gateway_url):
    with pytest.raises(openai.AuthenticationError) as exc:
        chat.list_models(chat.make_client(gateway_url, "wrong"))
    assert chat.describe_error(exc.value) == "401: Incorrect API key provided: ***."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(openai.APIConnectionError) as exc:
        chat.list_models(chat.make_client(dead, KEY, timeout_s=5))
    assert chat.describe_error(exc.value).startswith("cannot reach the gateway")


def _browser_skip_reason() -> str | None:
    if importlib.util.find_spec("streamlit") is None:
        return "streamlit is not installed (pip install -e '.[dev]')"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (`make browser`)"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (`make browser` installs Debian's chromium)"
    return None


@pytest.fixture(scope="module")
def chat_ui_url(gateway_url, tmp_path_factory):
    reason = _browser_skip_reason()
    if reason:
        pytest.skip(reason)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("chat_ui") / "streamlit.log"
    log = log_path.open("w")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TULPAR_CHAT_API_KEY": KEY,
        "TULPAR_CHAT_MODEL": "tulpar-tiny",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.chat_ui", "--port", str(port), "--base-url", gateway_url],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=2).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the chat UI did not come up: " + log_path.read_text()
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _set_slider(page, name: str, presses: int, key: str, shown: str) -> None:
    thumb = page.get_by_role("slider", name=name)
    thumb.focus()
    for _ in range(presses):
        thumb.press(key)
    slider = page.get_by_test_id("stSlider").filter(has_text=name)
    slider.get_by_text(shown, exact=True).first.wait_for(timeout=10_000)


def test_chat_in_headless_chromium(chat_ui_url, upstream, tmp_path):
    from playwright.sync_api import sync_playwright

    question = "Сәлем, Tulpar!"
    answer = f"Hello from tulpar-tiny-v1! You said: {question}"
    upstream.chunk_delay_s = 0.25  # 7 words: the answer takes ~1.75 s to stream
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 720})
                page.set_default_timeout(60_000)
                page.goto(chat_ui_url)
                box = page.get_by_test_id("stChatInput").locator("textarea")
                box.wait_for()
                picker = page.get_by_role("combobox", name="Model")
                assert picker.input_value() == "tulpar-tiny"  # TULPAR_CHAT_MODEL
                page.get_by_test_id("stSelectbox").get_by_role("button", name="Open").click()
                options = page.get_by_role("option")
                options.first.wait_for()
                assert options.all_inner_texts() == [
                    "tulpar-tiny",
                    "tulpar-tiny-v1",
                ]  # the gateway's /v1/models
                picker.press("Escape")
                _set_slider(page, "Temperature", 14, "ArrowLeft", "0.00")  # 0.70 -> 0.00 in steps of 0.05
                _set_slider(page, "Top-p", 2, "ArrowLeft", "0.90")
                box.fill(question)
                box.press("Enter")

                messages = page.get_by_test_id("stChatMessage")
                seen: list[str] = []
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if messages.count() >= 2:
                        text = messages.nth(1).inner_text().strip()
                        if not seen or text != seen[-1]:
                            seen.append(text)
                        if answer in text:
                            break
                    time.sleep(0.05)
                else:
                    pytest.fail(f"no streamed answer; saw {seen}")
                partial = [t for t in seen if t and answer not in t and answer.startswith(t.split("\n")[-1])]
                assert len(partial) >= 3, f"the answer appeared at once, not streamed: {seen}"
                assert messages.nth(0).inner_text().strip().endswith(question)
                shot = tmp_path / "chat_ui.png"
                page.screenshot(path=str(shot))
            finally:
                browser.close()
    finally:
        upstream.chunk_delay_s = 0.0
    sent = upstream.requests[-1]["body"]
    assert sent["model"] == "tulpar-tiny-v1" and sent["stream"] is True
    assert sent["temperature"] == 0.0 and sent["top_p"] == pytest.approx(0.9)
    assert sent["messages"][-1] == {"role": "user", "content": question}
    assert shot.stat().st_size > 10_000
    if os.environ.get("TULPAR_UPDATE_DOCS_IMG") and shot.stat().st_size < 200_000:
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "img" / "chat_ui.png")
