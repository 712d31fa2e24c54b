"""Property-based fuzzing of the chat API (Hypothesis) against the real app and a tiny random GPT.

Bodies are drawn from a mix of valid conversations and parameters, wrong types, out-of-range and huge
numbers, NaN/Infinity, odd Unicode (lone surrogates, emoji, special-token text), unknown fields, and raw
bytes that are not JSON at all. Every response must be < 500; errors must have OpenAI's exact shape; a 200
must be a well-formed completion or SSE stream with no error event; and the server still answers /health
afterwards, with no row left running. The default run sends 1,000 requests (about 40% of them valid and
generating; ~6 s on a laptop core); `-m slow` sends 5,000 more. Fields near and past their limits (stop
strings, messages, n, max_tokens) must get a 400 that names the field. Then the worst request the limits allow
is served over a real socket while /health is polled: every poll must answer within 100 ms.
"""

import json
import statistics
import threading
import time
from collections import Counter

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import cycle_gpt, running

from nanochat_core.gpt import GPT, GPTConfig
from nanochat_core.serve.chat_request import (
    MAX_CHOICES,
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_TOTAL_CHARS,
    StopText,
)
from nanochat_core.serve.server import ServeConfig, create_app
from nanochat_core.tokenizer import Tokenizer

STATUS: Counter = Counter()  # responses by status, over this module's run
AT_LIMIT: Counter = Counter()  # test_fuzz_fields_at_their_limits: (field, over its limit) -> bodies sent
PATHS = ["/v1/chat/completions", "/chat/completions"]
SEQ_LEN = 128


@pytest.fixture(scope="module")
def client(tiny_tokenizer_dir):
    tokenizer = Tokenizer.load(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                          n_kv_head=1, n_embd=32)).eval()
    app = create_app(model, tokenizer, ServeConfig(max_tokens=4, max_batch=8))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
        assert c.get("/health").json()["status"] == "ok"
        assert c.get("/stats").json()["requests_active"] == 0


# -----------------------------------------------------------------------------
# what to send

odd_text = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2) | st.sampled_from(
    ["", " \n\t", "<|python_start|>1+1<|python_end|>", "<|output_start|>2<|output_end|>", "<|bos|>", "🙂👍🏽" * 5,
     "你好", "\x00", "x" * 9000, "word " * 400])
text = st.text(max_size=40) | odd_text
scalar = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**80)
          | st.floats(allow_nan=True, allow_infinity=True) | text)
anything = st.recursive(scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                        max_size=3), max_leaves=6)


@st.composite
def conversation(draw, odd: bool = False) -> list:
    """A conversation in the right order (system? user (assistant user)*); with `odd`, odd contents too."""
    turns = draw(st.integers(0, 3))
    roles = (["system"] if draw(st.booleans()) else []) + ["user", "assistant"] * turns + ["user"]
    content = st.text(st.characters(exclude_categories=["Cs", "Z", "Cc"]), min_size=1, max_size=30)
    if odd:
        content = content | text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                            min_size=1, max_size=2)
    return [{"role": role, "content": draw(content)} for role in roles]


VALID = {  # parameters a client may send, with values we accept
    "temperature": st.floats(0, 2), "top_k": st.integers(0, 500), "top_p": st.floats(0.01, 1),
    "max_tokens": st.integers(1, 8), "max_completion_tokens": st.integers(1, 8), "n": st.integers(1, 3),
    "seed": st.integers(-(2**63), 2**63 - 1), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "model": st.text(max_size=10), "user": st.text(max_size=5), "frequency_penalty": st.just(0),
    "logprobs": st.just(False), "response_format": st.just({"type": "text"}), "tools": st.just([]),
}
near_limit = st.integers(-2, 1)  # added to a limit: at it, just under, just over
stop_length = st.sampled_from([MAX_STOP_CHARS - 1, MAX_STOP_CHARS, MAX_STOP_CHARS + 1, 40 * MAX_STOP_CHARS])
stop_near_limit = st.lists(st.builds(lambda n, c: c * n, stop_length, st.sampled_from("ab🙂")), min_size=1,
                           max_size=MAX_STOPS + 2)
OTHER = {  # the same parameters with values that are wrong more often than not
    "temperature": st.floats(-1, 3) | anything, "top_k": st.integers(-5, 1000) | anything,
    "top_p": st.floats(-0.5, 1.5) | anything,
    "max_tokens": st.integers(-3, 200) | st.integers(2**31, 2**70) | anything,
    "n": st.integers(-1, 10) | near_limit.map(lambda d: MAX_CHOICES + d) | st.integers(2**31, 2**70) | anything,
    "stop": text | st.lists(text, max_size=6) | stop_near_limit | stop_near_limit.map(lambda s: s[0]) | anything,
    "frequency_penalty": st.floats(-2, 2) | anything, "tools": anything, "stream": anything, "seed": anything,
}
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""])
                                 | anything, "content": text | anything}) | anything
valid_body = st.fixed_dictionaries({"messages": conversation()}, optional=VALID)


@st.composite
def big_conversation(draw) -> list:
    """Conversations at the limits: the most messages, the longest message, the most characters in all."""
    kind, d = draw(st.sampled_from(["count", "each", "total"])), draw(st.sampled_from([0, 1, 1, 100]))  # over: 3/4
    if kind == "count":  # an odd count ends with the user
        count = MAX_MESSAGES + d - (MAX_MESSAGES + d + 1) % 2
        return [{"role": ("user", "assistant")[i % 2], "content": "hi"} for i in range(count)]
    if kind == "each":
        return [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + d)}]
    total = MAX_TOTAL_CHARS + d  # over as few messages as the per-message limit allows, an odd number of them
    count = -(-total // MAX_MESSAGE_CHARS) | 1
    sizes = [total // count + (i < total % count) for i in range(count)]
    return [{"role": ("user", "assistant")[i % 2], "content": "x" * size} for i, size in enumerate(sizes)]


odd_body = st.fixed_dictionaries({"messages": conversation(odd=True) | st.lists(message, max_size=4) | anything},
                                 optional=OTHER)
LIMITS = {  # each field that costs work, near and past its limit
    "stop": stop_near_limit | stop_near_limit.map(lambda s: s[0]),
    "n": near_limit.map(lambda d: MAX_CHOICES + d) | st.integers(2**31, 2**70),
    "max_tokens": st.sampled_from([SEQ_LEN, SEQ_LEN + 1, 2**31, 2**70]),
    "messages": big_conversation(),
}
extra = st.dictionaries(st.text(max_size=8) | odd_text, anything, min_size=1, max_size=2)


@st.composite
def mutated(draw) -> dict:
    """A valid body with one field swapped for a wrong or odd value."""
    b = draw(valid_body)
    name = draw(st.sampled_from(sorted(OTHER)))
    return {**b, name: draw(OTHER[name])}


@st.composite
def at_limit(draw) -> dict:
    """A valid body with one field near or past its limit."""
    b = draw(valid_body)
    name = draw(st.sampled_from(sorted(LIMITS)))
    return {**b, name: draw(LIMITS[name])}


raw = st.binary(max_size=100) | st.builds(lambda b, cut: json.dumps(b).encode()[:cut], valid_body,
                                          st.integers(0, 200))
case = st.tuples(st.sampled_from(PATHS), st.one_of(
    valid_body.map(lambda b: json.dumps(b).encode()),
    valid_body.map(lambda b: json.dumps(b).encode()),
    mutated().map(lambda b: json.dumps(b).encode()),  # json.dumps writes NaN/Infinity and escapes surrogates
    odd_body.map(lambda b: json.dumps(b).encode()),
    at_limit().map(lambda b: json.dumps(b).encode()),
    st.builds(lambda b, x: json.dumps({**x, **b}).encode(), valid_body, extra),
    anything.map(lambda v: json.dumps(v).encode()),
    raw))


# -----------------------------------------------------------------------------
# what must come back

def check_error(response, sent) -> None:
    assert response.status_code in (400, 401, 404, 405, 429), response.status_code
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    if isinstance(sent, dict) and error["param"] in LIMITED:  # a field over its limit: named, with the limit
        assert error["param"].split("[")[0] in error["message"], error


LIMITED = {"stop", "n", "max_tokens", "max_completion_tokens"}


def check_ok(path: str, sent: dict, response) -> None:
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        if path == "/chat/completions":
            parsed = [json.loads(e) for e in events]
            assert parsed[-1] == {"done": True} and all(set(p) == {"token"} for p in parsed[:-1])
            return
        assert events[-1] == "[DONE]"
        for chunk in map(json.loads, events[:-1]):
            assert "error" not in chunk and chunk["object"] == "chat.completion.chunk"
        return
    reply = response.json()
    n = sent.get("n") or 1
    assert reply["object"] == "chat.completion" and [c["index"] for c in reply["choices"]] == list(range(n))
    assert all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    limit = sent.get("max_completion_tokens") or sent.get("max_tokens") or 4
    assert usage["completion_tokens"] <= n * limit


def exercise(client, path: str, data: bytes) -> dict | None:
    """Send `data`, check the response; the error, if it is one."""
    response = client.post(path, content=data, headers={"content-type": "application/json"})
    STATUS[response.status_code] += 1
    assert response.status_code < 500, (data[:300], response.text[:300])
    try:
        sent = json.loads(data)
    except ValueError:
        sent = None
    if response.status_code != 200:
        check_error(response, sent)
        return response.json()["error"]
    check_ok(path, sent, response)
    return None


FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@settings(FUZZ, max_examples=1000)
@given(case)
def test_fuzz_chat_api(client, sent):
    exercise(client, *sent)


@pytest.mark.slow
@settings(FUZZ, max_examples=5000)
@given(case)
def test_fuzz_chat_api_more(client, sent):
    exercise(client, *sent)


def exceeded_limit(field: str, value) -> int | None:
    """The limit that `value` is over, for `field` (the first one the server checks), or None."""
    if field == "stop":
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOPS:
            return MAX_STOPS
        return MAX_STOP_CHARS if max(map(len, stops)) > MAX_STOP_CHARS else None
    if field == "messages":
        lengths = [len(m["content"]) for m in value]
        return (MAX_MESSAGES if len(lengths) > MAX_MESSAGES else MAX_MESSAGE_CHARS if max(lengths) > MAX_MESSAGE_CHARS
                else MAX_TOTAL_CHARS if sum(lengths) > MAX_TOTAL_CHARS else None)
    limit = {"n": MAX_CHOICES, "max_tokens": SEQ_LEN}[field]
    return limit if value > limit else None


@pytest.mark.parametrize("field", sorted(LIMITS))
def test_fuzz_fields_at_their_limits(client, field):
    """A valid body with `field` near or past its limit: past it, a 400 naming the field and stating the limit."""
    @settings(FUZZ, max_examples=40)
    @given(valid_body, LIMITS[field])
    def check(body, value):
        body = {**body, field: value}
        body.pop("max_completion_tokens", None)  # it would stand in for max_tokens
        error, limit = exercise(client, "/v1/chat/completions", json.dumps(body).encode()), exceeded_limit(field, value)
        AT_LIMIT[field, limit is not None] += 1
        if limit is not None:
            assert error is not None and error["param"].split("[")[0] == field, error
            assert str(limit) in error["message"], (error, limit)

    check()
    assert AT_LIMIT[field, True] >= 1 and AT_LIMIT[field, False] + AT_LIMIT[field, True] == 40, AT_LIMIT


def test_health_after_fuzzing(client):
    assert client.get("/health").status_code == 200
    if STATUS.total() >= 1000:  # the fuzzing ran: enough of it got as far as generating
        assert STATUS[200] >= 200 and STATUS[400] >= 200, STATUS
        print(f"\nfuzz: responses by status {dict(STATUS)}; fields at their limits (field, over): {dict(AT_LIMIT)}")


# -----------------------------------------------------------------------------
# stop strings: linear, and the same cuts as the obvious (quadratic) rule

def reference_stop_text(stops: tuple[str, ...], deltas: list[str]) -> tuple[list[str], bool]:
    """What StopText must emit per delta: the text up to the earliest stop string seen so far, holding back any
    tail that is the start of one (the rule StopText had before it was made linear)."""
    held, out = "", []
    for delta in deltas:
        text = held + delta
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return out + [text[:min(hits)]], True
        keep = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        held = text[len(text) - keep:] if keep else ""
        out.append(text[:len(text) - keep])
    return out + [held], False


@settings(deadline=None, database=None, max_examples=400)
@given(st.lists(st.text("abc", min_size=1, max_size=6), min_size=1, max_size=MAX_STOPS).map(tuple),
       st.lists(st.text("abcd", max_size=5), max_size=12))
def test_stop_text_matches_the_reference(stops, deltas):
    cut = StopText(stops)
    out = [cut.push(d) for d in deltas]
    expected, stopped = reference_stop_text(stops, deltas)
    if stopped:
        assert cut.stopped and out[:len(expected)] == expected and not any(out[len(expected):])
    else:
        assert not cut.stopped and out + [cut.flush()] == expected


def test_stop_text_is_linear():
    """4 stop strings at the limit, each a run that the text keeps almost matching: 100 KB of text in ~1-char
    deltas must cost about 100 KB of work, not 100 KB x the stop length (the quadratic check took ~30 s)."""
    stops = tuple("a" * (MAX_STOP_CHARS - 1) + end for end in "bcde")
    cut, started = StopText(stops), time.perf_counter()
    emitted = "".join(cut.push("a") for _ in range(100_000))
    elapsed = time.perf_counter() - started
    assert emitted == "a" * (100_000 - (MAX_STOP_CHARS - 1)) and cut.push("b") == ""
    assert cut.stopped and elapsed < 3.0, elapsed


# -----------------------------------------------------------------------------
# the worst request the limits allow: /health must stay fast while it is served

HEALTH_BOUND_S = 0.1


def test_health_stays_fast_during_the_worst_allowed_request(tokenizer):
    """n at its limit, MAX_STOPS stop strings of MAX_STOP_CHARS that the reply keeps almost matching (so every
    token is checked against long partial matches), the longest reply the context allows, streamed. /health is
    polled over a real socket all the while; the slowest answer must be under 100 ms."""
    seq_len = 768
    model = cycle_gpt(tokenizer, seq_len)  # replies "abcabc..." and never stops by itself
    stops = [("abc" * MAX_STOP_CHARS)[i:i + MAX_STOP_CHARS - 1] + "x" for i in range(MAX_STOPS)]
    messages = [{"role": "user", "content": "Why is the sky blue? " * 10}]
    body = {"messages": messages, "n": MAX_CHOICES, "stop": stops, "temperature": 0, "stream": True}
    chunks: list = []
    with running(create_app(model, tokenizer, ServeConfig(max_tokens=seq_len))) as base:
        def worst() -> None:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                chunks.extend(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))

        latencies = []
        with httpx.Client(base_url=base, timeout=30) as health:
            health.get("/health")  # connected
            request = threading.Thread(target=worst)
            request.start()
            while request.is_alive():
                started = time.perf_counter()
                assert health.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)
            request.join()
    texts = ["".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"][0]["index"] == i)
             for i in range(MAX_CHOICES)]
    prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    assert texts == [("abc" * seq_len)[:seq_len - len(prompt)]] * MAX_CHOICES  # no stop string cut it short
    worst_s, median_s = max(latencies), statistics.median(latencies)
    print(f"\n/health during the worst allowed request ({MAX_CHOICES} x {seq_len - len(prompt)} tokens, "
          f"{MAX_STOPS} stop strings of {MAX_STOP_CHARS} chars): {len(latencies)} polls, max {worst_s * 1000:.1f} ms, "
          f"median {median_s * 1000:.1f} ms")
    assert len(latencies) >= 10  # the request lasted long enough to measure anything
    assert worst_s < HEALTH_BOUND_S, latencies
