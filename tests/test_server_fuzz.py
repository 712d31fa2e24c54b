"""Property-based fuzzing of the chat API (Hypothesis) against the real app and a tiny random GPT.

Bodies are drawn from a mix of valid conversations and parameters, wrong types, out-of-range and huge
numbers, NaN/Infinity, odd Unicode (lone surrogates, emoji, special-token text), unknown fields, and raw
bytes that are not JSON at all. Every response must be < 500; errors must have OpenAI's exact shape; a 200
must be a well-formed completion or SSE stream with no error event; and the server still answers /health
afterwards, with no row left running. The default run sends 1,000 requests (about 40% of them valid and
generating; ~6 s on a laptop core); `-m slow` sends 5,000 more.
"""

import json
from collections import Counter

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanochat_core.gpt import GPT, GPTConfig
from nanochat_core.serve.server import ServeConfig, create_app
from nanochat_core.tokenizer import Tokenizer

STATUS: Counter = Counter()  # responses by status, over this module's run
PATHS = ["/v1/chat/completions", "/chat/completions"]


@pytest.fixture(scope="module")
def client(tiny_tokenizer_dir):
    tokenizer = Tokenizer.load(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2,
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
OTHER = {  # the same parameters with values that are wrong more often than not
    "temperature": st.floats(-1, 3) | anything, "top_k": st.integers(-5, 1000) | anything,
    "top_p": st.floats(-0.5, 1.5) | anything, "max_tokens": st.integers(-3, 200) | anything,
    "n": st.integers(-1, 10) | anything, "stop": text | st.lists(text, max_size=6) | anything,
    "frequency_penalty": st.floats(-2, 2) | anything, "tools": anything, "stream": anything, "seed": anything,
}
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""])
                                 | anything, "content": text | anything}) | anything
valid_body = st.fixed_dictionaries({"messages": conversation()}, optional=VALID)
odd_body = st.fixed_dictionaries({"messages": conversation(odd=True) | st.lists(message, max_size=4) | anything},
                                 optional=OTHER)
extra = st.dictionaries(st.text(max_size=8) | odd_text, anything, min_size=1, max_size=2)


@st.composite
def mutated(draw) -> dict:
    """A valid body with one field swapped for a wrong or odd value."""
    b = draw(valid_body)
    name = draw(st.sampled_from(sorted(OTHER)))
    return {**b, name: draw(OTHER[name])}


raw = st.binary(max_size=100) | st.builds(lambda b, cut: json.dumps(b).encode()[:cut], valid_body,
                                          st.integers(0, 200))
case = st.tuples(st.sampled_from(PATHS), st.one_of(
    valid_body.map(lambda b: json.dumps(b).encode()),
    valid_body.map(lambda b: json.dumps(b).encode()),
    mutated().map(lambda b: json.dumps(b).encode()),  # json.dumps writes NaN/Infinity and escapes surrogates
    odd_body.map(lambda b: json.dumps(b).encode()),
    st.builds(lambda b, x: json.dumps({**x, **b}).encode(), valid_body, extra),
    anything.map(lambda v: json.dumps(v).encode()),
    raw))


# -----------------------------------------------------------------------------
# what must come back

def check_error(response) -> None:
    assert response.status_code in (400, 401, 404, 405, 429), response.status_code
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


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


def exercise(client, path: str, data: bytes) -> None:
    response = client.post(path, content=data, headers={"content-type": "application/json"})
    STATUS[response.status_code] += 1
    assert response.status_code < 500, (data[:300], response.text[:300])
    if response.status_code != 200:
        check_error(response)
        return
    sent = json.loads(data)
    check_ok(path, sent, response)


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


def test_health_after_fuzzing(client):
    assert client.get("/health").status_code == 200
    if STATUS.total() >= 1000:  # the fuzzing ran: enough of it got as far as generating
        assert STATUS[200] >= 200 and STATUS[400] >= 200, STATUS
