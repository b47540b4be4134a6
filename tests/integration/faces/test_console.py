"""The web console in a real browser (headless Chromium): on the three-node cluster it draws
every node and the model's chain as /api/ps plans it, and its chat streams the engine's
greedy answer; on a node with a token it asks for the token and shows a hostile peer's
name as text. Set ENJAMBRE_SCREENSHOT=docs/console.png to refresh the README's picture."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.api.app import build_app
from tests.helpers.faces import Faces
from tests.helpers.nodeview import OneNode

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMEDRIVER):
        pytest.skip("chromedriver is not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the page itself is 1280x900
                               {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, timeout: float, what: str, check: Any) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(check, message=f"the console never showed {what}")


# Read in one script: the page redraws every second, so elements found one call go stale the next.
def _drawn_nodes(driver: Any) -> dict[str, dict[str, str]]:
    return {c[0]: {"name": c[1], "text": c[2]} for c in driver.execute_script(
        "return [...document.querySelectorAll('#nodes .node[data-node-id]')]"
        ".map(c => [c.dataset.nodeId, c.querySelector('.node-name').textContent, c.textContent])")}


def _drawn_chain(driver: Any) -> list[tuple[str, int, int]]:
    return [(s[0], int(s[1]), int(s[2])) for s in driver.execute_script(
        "return [...document.querySelectorAll('#chains .chain .stage[data-node-id]')]"
        ".map(s => [s.dataset.nodeId, s.dataset.start, s.dataset.end])")]


def _csp_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def _set(driver: Any, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def test_console_draws_the_cluster_and_chats(faces: Faces, browser: Any, tmp_path: Path) -> None:
    status, body = faces.request("GET", "/api/ps")
    assert status == 200
    loaded = json.loads(body)["models"][0]
    plan = [(s["node_id"], s["start"], s["end"]) for s in loaded["plan"]]
    browser.get(faces.url("/"))
    want_nodes = {n.node_id for n in faces.nodes}
    _wait(browser, 30, "the three nodes", lambda d: set(_drawn_nodes(d)) == want_nodes)
    _wait(browser, 30, "the model's chain", lambda d: _drawn_chain(d) == plan)
    assert len(plan) == 3
    drawn = _drawn_nodes(browser)
    for n in json.loads(faces.request("GET", "/api/cluster/status")[1])["nodes"]:
        card = drawn[n["id"]]
        assert card["name"] == n["name"] and n["id"][:12] in card["text"] and n["state"] in card["text"]
        assert n["device"] in card["text"] and re.search(r"\d+\.\d\d TFLOPS", card["text"]), card
        assert "lent in use" in card["text"], card

    tok = faces.tokenizer
    messages = [{"role": "user", "content": "hola"}]
    ids = faces.reference(tok.encode_chat(messages), 12, penalty=1.1)  # Ollama's default repeat_penalty
    _wait(browser, 10, "the loaded model in the chat's list",
          lambda d: loaded["name"] in [o.get_attribute("value") for o in Select(d.find_element(By.ID, "chat-model")).options])
    Select(browser.find_element(By.ID, "chat-model")).select_by_value(loaded["name"])
    _set(browser, "chat-temperature", "0")
    _set(browser, "chat-num-predict", "12")
    browser.find_element(By.ID, "chat-input").send_keys("hola")
    browser.find_element(By.ID, "chat-send").click()
    answer = _wait(browser, 60, "the finished answer",
                   lambda d: d.find_elements(By.CSS_SELECTOR, '#chat-log .msg.assistant[data-done="true"]'))[0]
    assert not browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg.error")
    assert answer.get_property("textContent") == tok.decode(ids)
    tps = browser.find_element(By.ID, "tps").text
    assert re.match(r"\d+(\.\d+)? tokens/s", tps), tps
    assert f"· {len(ids)} tokens" in tps, tps
    assert set(_drawn_nodes(browser)) == want_nodes  # still live after the chat
    assert not _csp_errors(browser)

    browser.find_element(By.ID, "chat-input").click()  # leave the focus ring on the input, not a button
    browser.save_screenshot(str(tmp_path / "console.png"))
    if target := os.environ.get("ENJAMBRE_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(target), target

    _set(browser, "pull-input", "no-such-model-anywhere")
    browser.find_element(By.ID, "pull-send").click()
    _wait(browser, 30, "the pull's error", lambda d: "pull failed" in d.find_element(By.ID, "pull-text").text)


@pytest.fixture
def token_node() -> Iterator[str]:
    """A node API (token "s3cret") on a loopback port in a thread of its own; yields its URL."""
    from aiohttp import web

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(build_app(OneNode(name=HOSTILE, device=HOSTILE, memory_allowed=2**30, memory_used=2**28,
                                         memory_total=2**33, tflops=1.5), token="s3cret"))
    loop.run_until_complete(runner.setup())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def test_console_asks_for_the_token_and_keeps_names_as_text(token_node: str, browser: Any) -> None:
    browser.get(token_node)
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    form = _wait(browser, 10, "the token field", lambda d: d.find_element(By.ID, "token-form").is_displayed()
                 and d.find_element(By.ID, "token-form"))
    assert form.is_displayed()
    browser.find_element(By.ID, "token-input").send_keys("s3cret")
    browser.find_element(By.ID, "token-save").click()
    card = _wait(browser, 10, "the node", lambda d: d.find_elements(By.CSS_SELECTOR, "#nodes .node[data-node-id]"))[0]
    assert card.find_element(By.CSS_SELECTOR, ".node-name").get_property("textContent") == HOSTILE
    assert browser.execute_script("return localStorage.getItem('enjambre.token')") == "s3cret"
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1 and not browser.find_elements(By.CSS_SELECTOR, "#nodes img")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018
    browser.refresh()  # the token is remembered
    _wait(browser, 10, "the node after a reload", lambda d: d.find_elements(By.CSS_SELECTOR, "#nodes .node"))
    assert not browser.find_element(By.ID, "token-form").is_displayed()
    browser.execute_script("localStorage.clear()")
    browser.get("about:blank")  # closes the page's event stream
