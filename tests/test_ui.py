"""The web UI in a real headless Chromium (Playwright) against the real server and a tiny random GPT.

The server samples greedily here, so every reply the page shows can be compared with the Engine's own output.
Screenshots go to test-artifacts/ (gitignored)."""

import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn
from conftest import CHROMIUM

from nanochat_core.engine import Engine
from nanochat_core.gpt import GPT, GPTConfig
from nanochat_core.serve.server import ServeConfig, create_app

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
MAX_TOKENS = 24

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is not installed (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(1)
    config = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=32)
    return GPT(config).eval()


@pytest.fixture(scope="module")
def app(model, tokenizer):
    return create_app(model, tokenizer, ServeConfig(temperature=0.0, max_tokens=MAX_TOKENS))


@pytest.fixture(scope="module")
def url(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def page(browser, url):
    context = browser.new_context(viewport={"width": 1000, "height": 700})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto(url)
    yield page
    context.close()


def greedy_reply(model, tokenizer, messages) -> str:
    prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=MAX_TOKENS, temperature=0.0)
    specials = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    return tokenizer.decode([t for t in results[0][len(prompt):] if t not in specials])  # the server drops them


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_selector("#regenerate", state="visible")  # shown once the reply is complete


def bubbles(page) -> list[tuple[str, str]]:
    """(role, text) of every message shown."""
    return [tuple(b) for b in page.eval_on_selector_all(
        "#messages .message", "els => els.map(e => [e.classList[1], e.querySelector('.text').textContent])")]


def test_chat_streams_replies_multi_turn_regenerate_and_new_chat(page, model, tokenizer):
    assert page.title() == "nanochat"
    assert not page.is_visible("#banner")  # /health answered
    # count the updates of the streaming bubble: a streamed reply is written token by token
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver(records => {
            for (const r of records) if (r.target.closest && r.target.closest(".streaming")) updates++;
        }).observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true});
    }""")
    first = [{"role": "user", "content": "Hello there"}]
    reply = greedy_reply(model, tokenizer, first)
    assert reply.strip(), "test setup: the model should say something"
    send(page, "Hello there")
    assert bubbles(page) == [("user", "Hello there"), ("assistant", reply)]
    assert page.evaluate("updates") >= 2

    # Shift+Enter is a newline, Enter sends; the second turn sees the first
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.type("#input", "line two")
    assert page.input_value("#input") == "line one\nline two" and len(bubbles(page)) == 2
    page.press("#input", "Enter")
    page.wait_for_selector("#regenerate", state="visible")
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "line one\nline two"}]
    expected = [("user", "Hello there"), ("assistant", reply), ("user", "line one\nline two"),
                ("assistant", greedy_reply(model, tokenizer, second))]
    assert bubbles(page) == expected
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)

    page.click("#regenerate")  # greedy: the same reply again, replacing (not adding to) the last one
    page.wait_for_selector("#regenerate", state="visible")
    assert bubbles(page) == expected

    page.click("#new-chat")
    assert bubbles(page) == [] and page.is_visible(".empty")


def test_messages_are_text_not_html(page):
    attack = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    send(page, attack)
    assert bubbles(page)[0] == ("user", attack)
    assert page.evaluate("window.pwned") is None
    assert page.query_selector("#messages img") is None


def test_stop_button_ends_a_reply(page, app):
    with app.state.router.replicas[0].lock:  # the model is paused: the reply cannot start until we let go
        page.fill("#input", "Please wait")
        page.press("#input", "Enter")
        page.wait_for_selector("#stop", state="visible")
        assert page.is_hidden("#send")
        page.click("#stop")
        page.wait_for_selector("#send", state="visible")
    assert page.is_hidden("#stop")
    assert bubbles(page) == [("user", "Please wait"), ("assistant", "")]
    assert "(stopped)" in page.text_content("#messages .message.assistant")


def test_health_failure_is_shown(browser, url):
    context = browser.new_context()
    page = context.new_page()
    page.route("**/health", lambda route: route.abort())
    page.goto(url)
    page.wait_for_selector("#banner", state="visible")
    assert "Cannot reach the nanochat server" in page.text_content("#banner")
    context.close()


def test_readable_on_a_phone(browser, url, model, tokenizer):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(url)
    send(page, "Hi! " * 40)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    box = page.query_selector("#input").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-phone.png"))
    context.close()


def test_two_tabs_chat_at_once(browser, url, app, model, tokenizer):
    """Two people at once: their replies are decoded in one batch, and each tab shows its own."""
    pages = []
    for _ in range(2):
        context = browser.new_context()
        pages.append(context.new_page())
        pages[-1].set_default_timeout(20_000)
        pages[-1].goto(url)
    replica = app.state.router.replicas[0]
    with replica.lock:  # both questions arrive before either reply starts
        for page, question in zip(pages, ("Hello there", "What is a cat?"), strict=True):
            page.fill("#input", question)
            page.press("#input", "Enter")
        deadline = time.time() + 20
        while replica.stats()["requests_queued"] < 2:
            assert time.time() < deadline, "the requests did not arrive"
            time.sleep(0.02)
    for page, question in zip(pages, ("Hello there", "What is a cat?"), strict=True):
        page.wait_for_selector("#regenerate", state="visible")
        reply = greedy_reply(model, tokenizer, [{"role": "user", "content": question}])
        assert bubbles(page) == [("user", question), ("assistant", reply)]
        page.context.close()
