"""The chat server, run for real with uvicorn on 127.0.0.1 and a tiny random GPT; and the terminal chat.

Replies at temperature 0 are compared with the Engine's own greedy output, so the streaming, decoding
and prompt rendering are checked end to end, not just the response shapes."""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from nanochat_core.checkpoint import save_final_model
from nanochat_core.config import ConfigError
from nanochat_core.engine import Engine
from nanochat_core.gpt import GPT, GPTConfig
from nanochat_core.serve import chat_cli, server
from nanochat_core.serve.chat_request import MAX_CHOICES, MAX_MESSAGE_CHARS, MAX_MESSAGES
from nanochat_core.serve.server import ChatServer, ServeConfig, create_app, server_url

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 256
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=32)
    return GPT(config).eval()  # PyTorch's default init: non-zero logits, varied text


@contextlib.contextmanager
def running(app, **settings):
    """Serve `app` as main() does (ChatServer) on a free local port (port 0) in a thread; yields the base URL.
    `settings`: ServeConfig fields for the server (host, request_timeout)."""
    server = ChatServer(app, ServeConfig(**{"port": 0, **settings}), log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        assert server.port != 0  # the bound port
        yield server.url.rstrip("/")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def app(model, tokenizer):
    return create_app(model, tokenizer, ServeConfig(max_tokens=16))


@pytest.fixture(scope="module")
def url(app):
    with running(app) as base:
        yield base


def greedy_reply(model, tokenizer, messages, max_tokens: int) -> tuple[str, str]:
    """What the server should answer at temperature 0, and its finish reason."""
    prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    completion = results[0][len(prompt):]
    specials = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    text = tokenizer.decode([t for t in completion if t not in specials])  # the server never sends special tokens
    return text, "length" if len(completion) == max_tokens else "stop"


def sse_events(response: httpx.Response) -> list:
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


# -----------------------------------------------------------------------------
# endpoints

def test_health_stats_models_and_ui(url, model):
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["ready"] is True
    stats = httpx.get(f"{url}/stats").json()
    assert stats["model_config"]["sequence_len"] == SEQ_LEN and stats["requests_active"] == 0
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == health["model"]
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>nanochat</title>" in page.text
    missing = httpx.get(f"{url}/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_nanochat_stream_is_the_greedy_reply(url, model, tokenizer):
    body = {"messages": QUESTION, "temperature": 0.0, "max_tokens": 12}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
        events = [json.loads(e) for e in sse_events(r)]
    assert events[-1] == {"done": True}
    assert all(set(e) == {"token"} and e["token"] for e in events[:-1])
    text = "".join(e["token"] for e in events[:-1])
    assert text == greedy_reply(model, tokenizer, QUESTION, 12)[0]


def test_openai_stream_and_non_stream_agree(url, model, tokenizer):
    body = {"model": "anything", "messages": QUESTION, "temperature": 0, "max_tokens": 10}
    expected, reason = greedy_reply(model, tokenizer, QUESTION, 10)
    full = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
    assert full["object"] == "chat.completion"
    choice = full["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected} and choice["finish_reason"] == reason
    usage = full["usage"]
    assert usage["completion_tokens"] <= 10 and usage["total_tokens"] == usage["prompt_tokens"] + usage[
        "completion_tokens"]
    if reason == "length":
        assert usage["completion_tokens"] == 10
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=stream_body, timeout=30) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == expected
    assert chunks[-2]["choices"][0]["finish_reason"] == reason
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


def test_official_openai_client(url, model, tokenizer):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    expected, _ = greedy_reply(model, tokenizer, QUESTION, 8)
    reply = client.chat.completions.create(model="nanochat", messages=QUESTION, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == expected
    stream = client.chat.completions.create(model="nanochat", messages=QUESTION, temperature=0, max_tokens=8,
                                            stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected
    assert [m.id for m in client.models.list()] == [httpx.get(f"{url}/health").json()["model"]]
    several = client.chat.completions.create(model="nanochat", messages=QUESTION, temperature=1.0, max_tokens=8, n=2,
                                             seed=3, stop=["\n\n"])
    assert [c.index for c in several.choices] == [0, 1]
    assert all("\n\n" not in c.message.content for c in several.choices)
    assert several.usage.total_tokens == several.usage.prompt_tokens + several.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="nanochat", messages=QUESTION, max_tokens=SEQ_LEN)
    assert info.value.code == "context_length_exceeded"


def test_system_message_and_multi_turn_with_tool_markers(url, model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2*3?"},
                {"role": "assistant", "content": "<|python_start|>2*3<|python_end|><|output_start|>6<|output_end|>6"},
                {"role": "user", "content": "Thanks!"}]
    full = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 6})
    assert full.status_code == 200
    # the tool markers became tool tokens again, as the model produced them
    rendered = [{"role": "user", "content": "Be brief.\n\nWhat is 2*3?"},
                {"role": "assistant", "content": [{"type": "python", "text": "2*3"},
                                                  {"type": "python_output", "text": "6"},
                                                  {"type": "text", "text": "6"}]},
                {"role": "user", "content": "Thanks!"}]
    assert full.json()["choices"][0]["message"]["content"] == greedy_reply(model, tokenizer, rendered, 6)[0]


def test_default_max_tokens_and_sampling_vary_by_seed(url):
    def ask(seed):
        body = {"messages": QUESTION, "temperature": 1.0, "seed": seed}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()

    a, b, c = ask(1), ask(1), ask(2)
    assert a["usage"]["completion_tokens"] <= 16  # ServeConfig(max_tokens=16)
    assert a["choices"] == b["choices"] and a["choices"] != c["choices"]


# -----------------------------------------------------------------------------
# validation: always 400 with OpenAI's error shape

def many(n):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(n)]


BAD_BODIES = [
    ({"messages": []}, "messages", None),
    ({"messages": many(MAX_MESSAGES + 1)}, "messages", None),
    ({}, "messages", None),
    ({"messages": "hello"}, "messages", None),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "  \n"}]}, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]}, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", None),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages[1].role", None),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "messages[1].role", None),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "messages[0].role", None),
    ({"messages": many(2)}, "messages", None),  # ends with the assistant
    ({"messages": ["hi"]}, "messages[0]", None),
    ({"messages": QUESTION, "temperature": -0.1}, "temperature", None),
    ({"messages": QUESTION, "temperature": 2.5}, "temperature", None),
    ({"messages": QUESTION, "temperature": "hot"}, "temperature", None),
    ({"messages": QUESTION, "top_k": -1}, "top_k", None),
    ({"messages": QUESTION, "top_k": 10_000}, "top_k", None),
    ({"messages": QUESTION, "top_k": 1.5}, "top_k", None),
    ({"messages": QUESTION, "max_tokens": 0}, "max_tokens", None),
    ({"messages": QUESTION, "max_tokens": SEQ_LEN + 1}, "max_tokens", None),
    ({"messages": QUESTION, "max_tokens": True}, "max_tokens", None),
    ({"messages": QUESTION, "max_tokens": SEQ_LEN - 3}, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "word " * 1500}]}, "messages", "context_length_exceeded"),
    ({"messages": QUESTION, "n": MAX_CHOICES + 1}, "n", None),
    ({"messages": QUESTION, "n": 0}, "n", None),
    ({"messages": QUESTION, "stop": 5}, "stop", None),
    ({"messages": QUESTION, "stop": ["a", ""]}, "stop", None),
    ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"messages": QUESTION, "temprature": 0.5}, "temprature", "unknown_parameter"),
    ({"messages": QUESTION, "frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
    ({"messages": QUESTION, "tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
    ({"messages": QUESTION, "model": 7}, "model", None),
    ({"messages": QUESTION, "stream_options": {"include_usage": "yes"}}, "stream_options", None),
    ({"messages": QUESTION, "top_p": 0}, "top_p", None),
    ([1, 2], None, None),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_bad_requests_get_400_in_openai_shape(url, path):
    with httpx.Client(base_url=url, timeout=30) as client:
        for body, param, code in BAD_BODIES:
            r = client.post(path, json=body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["type"] == "invalid_request_error"
            assert (error["param"], error["code"]) == (param, code), (str(body)[:80], error)
        for raw in (b"{not json", b"", b"\xff\xfe", b"[" * 100_000, b'{"messages": NaN}',
                    b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b'{"\\udfff": 1}'):
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", raw
        r = client.post(path, content=b"x" * (2 << 20))  # too large: 413 (test_oversized_bodies_get_413)
        assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    bad_stream = httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION, "stream": "yes"})
    assert bad_stream.status_code == 400 and bad_stream.json()["error"]["param"] == "stream"


def test_api_key(model, tokenizer):
    with running(create_app(model, tokenizer, ServeConfig(api_key="s3cret", max_tokens=4))) as base:
        assert httpx.get(f"{base}/health").status_code == 200  # health checks need no key
        assert httpx.get(f"{base}/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(f"{base}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = httpx.post(f"{base}/chat/completions", json={"messages": QUESTION}, headers=headers)
            assert r.status_code == 401
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert client.chat.completions.create(model="x", messages=QUESTION, max_tokens=4).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()


# -----------------------------------------------------------------------------
# concurrency: continuous batching, replicas, disconnects

def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def in_threads(fn, args_list: list, stagger: float = 0.0) -> list:
    """fn(*args) for each args in threads (started `stagger` s apart); the results in order."""
    results, errors = [None] * len(args_list), []

    def run(i, args):
        try:
            results[i] = fn(*args)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def ask(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


PROMPTS = ["Why is the sky blue?", "Tell me a story about a cat.", "2+2=?", "What is the capital of France? " * 4,
           "Hi", "Summarise the plot of Hamlet in one line."]


def test_batched_replies_equal_solo_replies_and_health_stays_responsive(url, app, model, tokenizer):
    """Different prompts, lengths and sampling settings: a reply is the same alone or decoded in a batch."""
    bodies = [{"messages": [{"role": "user", "content": text}], "max_tokens": 5 + 3 * i,
               "temperature": 0 if i % 2 == 0 else 0.9, "seed": i, "top_k": 20 * i, "top_p": 0.9 if i == 3 else None}
              for i, text in enumerate(PROMPTS)]
    solo = [ask(url, body)["choices"] for body in bodies]
    greedy = greedy_reply(model, tokenizer, [{"role": "user", "content": PROMPTS[0]}], 5)[0]
    assert solo[0][0]["message"]["content"] == greedy
    replica = app.state.router.replicas[0]
    before = replica.stats()
    with replica.lock:  # all arrive while the replica is paused: they are admitted together, one batch
        results = []
        waiter = threading.Thread(target=lambda: results.extend(in_threads(ask, [(url, b) for b in bodies])))
        waiter.start()
        wait_for(lambda: replica.stats()["requests_queued"] == len(bodies))
        started = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert time.perf_counter() - started < 2.0
    waiter.join(timeout=60)
    assert [r["choices"] for r in results] == solo
    after = replica.stats()
    tokens = after["tokens_generated"] - before["tokens_generated"]
    steps = after["decode_steps"] - before["decode_steps"]
    stops = sum(r["choices"][0]["finish_reason"] == "stop" for r in results)  # the stop token is generated too
    assert tokens == sum(r["usage"]["completion_tokens"] for r in results) + stops
    assert steps <= max(b["max_tokens"] for b in bodies) < tokens  # one forward pass served many rows
    # arriving one after another, joining a batch that is already running: still the same replies
    staggered = in_threads(ask, [(url, b) for b in bodies] * 2, stagger=0.01)
    assert [r["choices"] for r in staggered] == solo * 2


def cycle_gpt(tokenizer, sequence_len: int = 4096, cycle: list[int] | None = None) -> GPT:
    """A GPT whose greedy reply repeats the tokens `cycle` (default: "abcabc..."): it never stops by itself."""
    cycle = cycle or [tokenizer.encode(ch)[0] for ch in "abc"]
    n = len(cycle)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1,
                          n_kv_head=1, n_embd=32))
    model.init_weights()  # identity blocks; then a cycle token i -> token i+1 from any token: it never stops
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[:, n] = 0.1  # every token not in the cycle looks like the last one
        for dim, token in enumerate(cycle):
            model.transformer.wte.weight[token] = 0.0
            model.transformer.wte.weight[token, dim] = 1.0
            model.lm_head.weight[cycle[(dim + 1) % n], dim] = 1.0
        model.lm_head.weight[cycle[0], n] = 1.0
    return model.eval()


def test_max_tokens_exact_n_choices_and_stop_strings(tokenizer):
    app = create_app(cycle_gpt(tokenizer, 256), tokenizer, ServeConfig(max_tokens=100))
    with running(app) as base:
        reply = ask(base, {"messages": QUESTION, "temperature": 0, "max_tokens": 7})
        assert reply["choices"][0]["message"]["content"] == "abcabca"
        assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 7
        # n choices: choice i is the reply to the same request with seed + i
        many = ask(base, {"messages": QUESTION, "temperature": 2.0, "top_k": 0, "max_tokens": 6, "n": 3, "seed": 5})
        assert [c["index"] for c in many["choices"]] == [0, 1, 2]
        alone = [ask(base, {"messages": QUESTION, "temperature": 2.0, "top_k": 0, "max_tokens": 6, "seed": 5 + i})
                 for i in range(3)]
        assert [c | {"index": 0} for c in many["choices"]] == [a["choices"][0] for a in alone]
        assert len({c["message"]["content"] for c in many["choices"]}) > 1
        assert many["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
        # stop strings end a reply before them (also when they span tokens) and free the row
        stopped = ask(base, {"messages": QUESTION, "temperature": 0, "max_tokens": 50, "stop": ["bca", "zzz"]})
        assert stopped["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "a"},
                                         "finish_reason": "stop"}
        body = {"messages": QUESTION, "temperature": 0, "max_tokens": 50, "stop": "cab", "stream": True, "n": 2}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            chunks = [json.loads(e) for e in sse_events(r)[:-1]]
        for i in range(2):
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
            assert "".join(c["delta"].get("content", "") for c in mine) == "ab"
            assert mine[-1]["finish_reason"] == "stop" and mine[0]["delta"]["role"] == "assistant"
        wait_for(lambda: httpx.get(f"{base}/stats").json()["requests_active"] == 0)


def test_requests_go_to_the_least_busy_replica(model, tokenizer):
    app = create_app(model, tokenizer, ServeConfig(num_replicas=2, max_tokens=4))
    first, second = app.state.router.replicas
    assert first.model is second.model  # on a CPU the replicas share the weights
    with running(app) as base:
        stats = lambda: httpx.get(f"{base}/stats").json()  # noqa: E731
        with first.lock:  # replica 0 is busy: its request waits, the next one goes to replica 1 and is served
            waiting = threading.Thread(target=ask, args=(base, {"messages": QUESTION, "temperature": 0}))
            waiting.start()
            wait_for(lambda: stats()["replicas"][0]["requests_queued"] == 1)
            reply = ask(base, {"messages": QUESTION, "temperature": 0})
            per = stats()["replicas"]
            assert per[0]["requests_queued"] == 1 and per[1]["requests_served"] == 1
            assert per[1]["tokens_generated"] >= reply["usage"]["completion_tokens"]
        waiting.join(timeout=30)
        total = stats()
        assert total["requests_served"] == 2 and total["requests_total"] == 2 and len(total["replicas"]) == 2
        assert total["tokens_per_s"] > 0 and httpx.get(f"{base}/health").json()["replicas"] == 2


def test_disconnect_while_queued_or_generating_stops_the_work(tokenizer):
    app = create_app(cycle_gpt(tokenizer), tokenizer, ServeConfig(max_tokens=4000))
    replica = app.state.router.replicas[0]
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 3000}
    with running(app) as base:
        stats = lambda: httpx.get(f"{base}/stats").json()  # noqa: E731
        # 1. queued: the model is busy (we pause its replica); the client leaves before its turn
        with replica.lock:
            with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=30) as r:
                assert r.status_code == 200
                wait_for(lambda: stats()["requests_queued"] == 1)
            wait_for(lambda: stats()["requests_disconnected"] == 1)  # the server noticed
        wait_for(lambda: stats()["requests_active"] == 0 and stats()["requests_queued"] == 0)
        assert stats()["tokens_generated"] == 0
        # 2. generating: the clients read a few tokens and leave; the others in the batch go on
        keeper = threading.Thread(target=ask, args=(base, {**body, "max_tokens": 400}))
        keeper.start()
        for path in ("/chat/completions", "/v1/chat/completions"):
            with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=30) as r:
                events = (line for line in r.iter_lines() if line.startswith("data: "))
                assert all(next(events) for _ in range(3))
        wait_for(lambda: stats()["requests_disconnected"] == 3)
        wait_for(lambda: stats()["requests_active"] <= 1)
        keeper.join(timeout=60)
        # 3. a non-streaming client that gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json=body, timeout=0.5)
        wait_for(lambda: stats()["requests_disconnected"] == 4)
        wait_for(lambda: stats()["requests_active"] == 0)
        assert stats()["requests_served"] == 1 and 400 < stats()["tokens_generated"] < 3 * 3000


# -----------------------------------------------------------------------------
# the command lines (server main() and the terminal chat)

@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    save_final_model(out, model, {"model_config": model.config.to_dict(), "step": 0})
    return out


def test_server_main_serves_a_saved_model(model_dir, tiny_tokenizer_dir, model, tokenizer):
    """Port 0: the server picks a free port and the URL it logs is the real one (it answers there)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_API_KEY": ""}
    cmd = [sys.executable, "-m", "nanochat_core.serve", "--model", str(model_dir), "--tokenizer",
           str(tiny_tokenizer_dir), "--port", "0", "--device-type", "cpu", "--max-tokens", "5",
           "--num-replicas", "2", "--max-batch", "4"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.decode() for line in proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: proc.poll() is not None or any("serving at " in line for line in lines), timeout=60)
        assert proc.poll() is None, "".join(lines)
        url = next(line for line in lines if "serving at " in line).split("serving at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/") and not url.endswith(":0/"), url
        assert httpx.get(f"{url}health").json()["replicas"] == 2
        body = {"messages": QUESTION, "temperature": 0}
        reply = httpx.post(f"{url}v1/chat/completions", json=body, timeout=30).json()
        assert reply["choices"][0]["message"]["content"] == greedy_reply(model, tokenizer, QUESTION, 5)[0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_server_main_reports_a_bad_model_dir(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(SystemExit) as info:
        server.main(["--model", str(tmp_path), "--tokenizer", str(tiny_tokenizer_dir), "--device-type", "cpu"])
    assert "error" in str(info.value.code) and "meta.json" in str(info.value.code)
    with pytest.raises(SystemExit) as info:  # a config value out of range is named before anything loads
        server.main(["--model", str(tmp_path), "--tokenizer", str(tiny_tokenizer_dir), "--temperature", "9"])
    assert "ServeConfig.temperature" in str(info.value.code)


def test_chat_cli_one_prompt(model_dir, tiny_tokenizer_dir, model, tokenizer, capsys):
    chat_cli.main(["--model", str(model_dir), "--tokenizer", str(tiny_tokenizer_dir), "-p", "Why is the sky blue?",
                   "-t", "0", "-m", "10", "--device-type", "cpu"])
    assert capsys.readouterr().out == greedy_reply(model, tokenizer, QUESTION, 10)[0] + "\n"


def test_chat_cli_repl(model_dir, tiny_tokenizer_dir, model, tokenizer, capsys, monkeypatch):
    lines = ["Why is the sky blue?", "And why?", "clear", "Why is the sky blue?", "quit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    chat_cli.main(["--model", str(model_dir), "--tokenizer", str(tiny_tokenizer_dir), "-t", "0", "-m", "6",
                   "--device-type", "cpu"])
    out = capsys.readouterr().out
    first, _ = greedy_reply(model, tokenizer, QUESTION, 6)
    assert "(new conversation)" in out
    # the same first question before and after 'clear' gets the same answer; the follow-up saw the history
    answers = [part.split("\n")[0] for part in out.split("nanochat: ")[2:]]
    assert len(answers) == 3 and answers[0] == answers[2] == first.split("\n")[0]


# -----------------------------------------------------------------------------
# hardening (issue 13): limits, special tokens, oversized and idle requests, HEAD, addresses

def test_over_limit_fields_get_a_400_naming_the_field_and_limit(url):
    from nanochat_core.serve.chat_request import MAX_STOP_CHARS, MAX_STOPS, MAX_TOTAL_CHARS

    long_turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * MAX_MESSAGE_CHARS}
                  for i in range(2 * (MAX_TOTAL_CHARS // MAX_MESSAGE_CHARS // 2 + 1))]  # then one more user turn
    cases = [  # body, param, the limit the message must state
        ({"stop": ["x" * (MAX_STOP_CHARS + 1)]}, "stop", MAX_STOP_CHARS),
        ({"stop": "x" * 255_000}, "stop", MAX_STOP_CHARS),
        ({"stop": ["a", "x" * 255_000, "b"]}, "stop", MAX_STOP_CHARS),
        ({"stop": ["a"] * (MAX_STOPS + 1)}, "stop", MAX_STOPS),
        ({"stop": ["a", 5]}, "stop", None),
        ({"stop": {"a": 1}}, "stop", None),
        ({"messages": many(MAX_MESSAGES + 1)}, "messages", MAX_MESSAGES),
        ({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]}, "messages[0].content",
         MAX_MESSAGE_CHARS),
        ({"messages": long_turns + [{"role": "user", "content": "hi"}]}, "messages", MAX_TOTAL_CHARS),
        ({"n": MAX_CHOICES + 1}, "n", MAX_CHOICES),
        ({"n": 10**30}, "n", MAX_CHOICES),
        ({"max_tokens": SEQ_LEN + 1}, "max_tokens", SEQ_LEN),
        ({"max_completion_tokens": 2**64}, "max_completion_tokens", SEQ_LEN),
    ]
    with httpx.Client(base_url=url, timeout=30) as client:
        for fields, param, limit in cases:
            r = client.post("/v1/chat/completions", json={"messages": QUESTION, **fields})
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == param, (str(fields)[:80], r.status_code, error)
            assert param.split("[")[0] in error["message"], error
            if limit is not None:
                assert str(limit) in error["message"], error


def test_special_tokens_never_appear_in_reply_text(tokenizer):
    """A model that calls the calculator: <|python_start|>1+2<|python_end|>, then the forced
    <|output_start|>3<|output_end|>. The reply text has the tokens' text, without the special tokens."""
    special = tokenizer.encode_special
    cycle = [special("<|python_start|>"), *(tokenizer.encode(ch)[0] for ch in "1+2"), special("<|python_end|>")]
    model = cycle_gpt(tokenizer, 256, cycle)
    prompt = tokenizer.render_for_completion({"messages": QUESTION + [{"role": "assistant", "content": ""}]})
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=20, temperature=0.0)
    specials = {special(name) for name in tokenizer.get_special_tokens()}
    generated = results[0][len(prompt):]
    assert specials & set(generated)  # the model does produce special tokens (and the calculator forces some)
    expected = tokenizer.decode([t for t in generated if t not in specials])
    assert expected.startswith("1+23")
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 20}
    with running(create_app(model, tokenizer, ServeConfig())) as base:
        full = ask(base, body)["choices"][0]["message"]["content"]
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            chunks = [json.loads(e) for e in sse_events(r)[:-1]]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=30) as r:
            nanochat = "".join(json.loads(e).get("token", "") for e in sse_events(r))
    assert full == streamed == nanochat == expected, (full, streamed, nanochat)


def test_non_ascii_api_key(model, tokenizer):
    key = "clé-🔑"
    with running(create_app(model, tokenizer, ServeConfig(api_key=key, max_tokens=4))) as base:
        right = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}".encode()})
        assert right.status_code == 200, right.text
        wrong = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer clé-🔒".encode()})
        assert wrong.status_code == 401
        mangled = f"Bearer {key}".encode().decode("latin-1").encode()  # UTF-8 bytes read as Latin-1: not the key
        latin1 = httpx.get(f"{base}/v1/models", headers={"Authorization": mangled})
        assert latin1.status_code == 401


def raw_request(url: str, head: bytes, pieces=()) -> tuple[int, bytes]:
    """Send a request over a plain socket (head, then the body pieces) and read the reply to its end: status, body.
    The server closes the connection after it (Connection: close in `head`)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=30) as s:
        s.sendall(head)
        for piece in pieces:
            s.sendall(piece)
        reply = b""
        while chunk := s.recv(1 << 16):
            reply += chunk
    headers, _, body = reply.partition(b"\r\n\r\n")
    return int(headers.split()[1]), body


def test_oversized_bodies_get_413(url):
    """Over MAX_BODY_BYTES: 413 with an OpenAI-shaped error, also when the client asked the server to close the
    connection after the reply (closing with the body unread resets the connection: the client never sees it)."""
    def too_large(r_status: int, body: bytes) -> None:
        assert r_status == 413, (r_status, body[:200])
        error = json.loads(body)["error"]
        assert "larger than" in error["message"] and str(server.MAX_BODY_BYTES) in error["message"], error

    def chunks():  # 12 MB, chunked (no Content-Length)
        for _ in range(12):
            yield b"x" * (1 << 20)

    for content in (chunks(), b"x" * (12 << 20)):
        r = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=30,
                       headers={"content-type": "application/json"})
        too_large(r.status_code, r.content)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    too_large(*raw_request(url, head + b"Transfer-Encoding: chunked\r\n\r\n",
                           [b"100000\r\n" + piece + b"\r\n" for piece in chunks()] + [b"0\r\n\r\n"]))
    too_large(*raw_request(url, head + b"Content-Length: %d\r\n\r\n" % (12 << 20), chunks()))
    assert httpx.get(f"{url}/health").status_code == 200


def test_head_answers_like_get_without_a_body(url):
    for path in ("/", "/health"):
        get, head = httpx.get(f"{url}{path}"), httpx.head(f"{url}{path}")
        assert head.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
        assert head.headers["content-length"] == get.headers["content-length"]


def test_addresses_and_ports():
    assert server_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"
    assert server_url("::1", 8000) == "http://[::1]:8000/"
    assert server_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/"  # a wildcard address: connect to loopback
    assert server_url("::", 80) == "http://[::1]:80/"
    assert server_url("fe80::1%eth0", 8000) == "http://[fe80::1%eth0]:8000/"
    assert server_url("example.org", 8000) == "http://example.org:8000/"
    for port in (-1, 65536, 10**6):
        with pytest.raises(ConfigError, match=r"ServeConfig.port: .* is not a TCP port \(0-65535"):
            ServeConfig(port=port).validate()
    for timeout in (0, -1, 1e9):
        with pytest.raises(ConfigError, match="ServeConfig.request_timeout"):
            ServeConfig(request_timeout=timeout).validate()


def test_ipv6_loopback_on_a_free_port(model, tokenizer):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with running(create_app(model, tokenizer, ServeConfig(max_tokens=4)), host="::1") as base:
        assert base.startswith("http://[::1]:")
        assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_idle_partial_requests_are_closed(model, tokenizer):
    """Half the headers, half the body, or nothing: 408 and closed after request_timeout (0.5 s here). A request
    that is all in may take longer than that to answer."""
    app = create_app(model, tokenizer, ServeConfig(max_tokens=4))
    with running(app, request_timeout=0.5) as base:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        partial = (b"", head, head + b"Content-Length: 100\r\n\r\n" + b'{"messages": [',
                   head + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mes\r\n")
        sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in partial]
        started = time.perf_counter()
        for s, sent in zip(sockets, partial, strict=True):  # all at once: they time out together
            s.sendall(sent)
        for s, sent in zip(sockets, partial, strict=True):
            with s:
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
            elapsed = time.perf_counter() - started
            assert 0.4 < elapsed < 3, (sent, elapsed)
            assert reply.startswith(b"HTTP/1.1 408 "), (sent, reply)
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
        replica = app.state.router.replicas[0]
        with httpx.Client(base_url=base, timeout=30) as client:  # one keep-alive connection
            with replica.lock:  # the request is in, but its answer takes longer than the timeout
                waiting = threading.Thread(target=lambda: results.append(client.post(
                    "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2})))
                results: list = []
                waiting.start()
                time.sleep(0.8)
            waiting.join(timeout=30)
            assert results[0].status_code == 200, results[0].text
            assert client.get("/health").status_code == 200  # the same connection serves the next request
