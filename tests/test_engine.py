"""The KV-cache engine against a cache-free greedy loop, sampling properties, the calculator tool, and the
calculator's safety. Models are tiny real GPTs: random ones, and a hand-wired one whose greedy output is a
chosen token chain (blocks are identity because init_weights zeroes their output projections, so the
logits depend only on the last token through wte and lm_head)."""

import threading

import pytest
import torch

from nanochat_core.calculator import calculate
from nanochat_core.engine import Engine, IncrementalDecoder, KVCache, RowState, sample_next_token
from nanochat_core.gpt import GPT, GPTConfig
from nanochat_core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_dir)


def random_gpt(vocab_size: int, seed: int = 0, n_kv_head: int = 1) -> GPT:
    """A small GPT with PyTorch's default (non-zero) init everywhere, so attention matters."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=n_kv_head,
                          n_embd=32))
    return model.eval()


def chain_gpt(vocab_size: int, transitions: dict[int, int]) -> GPT:
    """A GPT whose greedy next token after t is transitions[t] (for the tokens named there)."""
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=32))
    model.init_weights()  # zero lm_head and block output projections: every block is the identity
    sources = sorted(set(transitions) | set(transitions.values()))
    assert len(sources) <= 32
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        for dim, token in enumerate(sources):
            model.transformer.wte.weight[token, dim] = 1.0  # one direction per token
        for src, dst in transitions.items():
            model.lm_head.weight[dst, sources.index(src)] = 1.0
    return model.eval()


def naive_greedy(model: GPT, tokens: list[int], steps: int) -> list[int]:
    ids = list(tokens)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(tokens):]


def prompt_ids(tokenizer: Tokenizer, text: str = "The capital of France is") -> list[int]:
    return tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())


# -----------------------------------------------------------------------------
# KV cache

def test_kv_cache_grows_and_keeps_contents():
    cache = KVCache(batch_size=2, num_heads=3, seq_len=4, head_dim=5, num_layers=2)
    first = [torch.randn(2, 3, 3, 5) for _ in range(4)]
    for layer in range(2):
        cache.insert_kv(layer, first[2 * layer], first[2 * layer + 1])
    assert cache.get_pos() == 3
    more = [torch.randn(2, 3, 6, 5) for _ in range(4)]
    for layer in range(2):
        k, v = cache.insert_kv(layer, more[2 * layer], more[2 * layer + 1])
        assert k.shape == v.shape == (2, 3, 9, 5)
        assert torch.equal(k, torch.cat([first[2 * layer], more[2 * layer]], dim=2))
        assert torch.equal(v, torch.cat([first[2 * layer + 1], more[2 * layer + 1]], dim=2))
    assert cache.get_pos() == 9 and cache.capacity >= 9


def test_kv_cache_prefill_replicates_a_batch_one_cache():
    src = KVCache(batch_size=1, num_heads=2, seq_len=5, head_dim=4, num_layers=3)
    kvs = [(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)) for _ in range(3)]
    for layer, (k, v) in enumerate(kvs):
        src.insert_kv(layer, k, v)
    dst = KVCache(batch_size=3, num_heads=2, seq_len=9, head_dim=4, num_layers=3)
    dst.prefill(src)
    assert dst.get_pos() == 5
    for layer, (k, v) in enumerate(kvs):
        ks, vs = dst.insert_kv(layer, torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4))
        assert torch.equal(ks[:, :, :5], k.expand(3, -1, -1, -1))
        assert torch.equal(vs[:, :, :5], v.expand(3, -1, -1, -1))
    with pytest.raises(ValueError, match="does not fit"):
        KVCache(batch_size=2, num_heads=2, seq_len=4, head_dim=4, num_layers=3).prefill(src)


def test_kv_cache_dtype_follows_the_model(tokenizer):
    cache = KVCache(batch_size=1, num_heads=1, seq_len=4, head_dim=2, num_layers=1)
    cache.insert_kv(0, torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16), torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16))
    assert cache.kv.dtype == torch.bfloat16
    model = random_gpt(tokenizer.get_vocab_size()).to(torch.bfloat16)
    results, _ = Engine(model, tokenizer).generate_batch(prompt_ids(tokenizer), max_tokens=4, temperature=0.0)
    assert len(results[0]) <= len(prompt_ids(tokenizer)) + 4


def test_kv_cache_rejects_mismatched_shapes():
    cache = KVCache(batch_size=2, num_heads=2, seq_len=4, head_dim=4, num_layers=1)
    with pytest.raises(ValueError, match="insert_kv expects"):
        cache.insert_kv(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))


# -----------------------------------------------------------------------------
# sampling

def test_sample_next_token_greedy_top_k_and_top_p():
    rng = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(2000, 1)
    assert sample_next_token(logits[:2], rng, temperature=0.0)[:, 0].tolist() == [1, 1]
    top2 = sample_next_token(logits, rng, temperature=1.0, top_k=2)[:, 0]
    assert set(top2.tolist()) == {1, 3}
    for no_top_k in (0, None):  # 0 means no top-k (upstream crashed on it)
        assert set(sample_next_token(logits, rng, 1.0, top_k=no_top_k)[:, 0].tolist()) == {0, 1, 2, 3}
    # p(1) = 0.64, p(3) = 0.24: top_p 0.5 keeps only token 1, 0.8 keeps 1 and 3
    assert set(sample_next_token(logits, rng, 1.0, top_p=0.5)[:, 0].tolist()) == {1}
    assert set(sample_next_token(logits, rng, 1.0, top_p=0.8)[:, 0].tolist()) == {1, 3}


# -----------------------------------------------------------------------------
# the engine

def test_engine_matches_a_cache_free_greedy_loop(tokenizer):
    model = random_gpt(tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer)
    prompt = prompt_ids(tokenizer)
    steps = 20
    expected = naive_greedy(model, prompt, steps)
    got = [column for column, _ in engine.generate(prompt, num_samples=3, max_tokens=steps, temperature=0.0)]
    stops = {engine.assistant_end, engine.bos}
    n = next((i + 1 for i, t in enumerate(expected) if t in stops), steps)  # the engine stops at a stop token
    assert len(got) == n
    for row in range(3):
        assert [column[row] for column in got] == expected[:n]


def test_engine_with_grouped_query_attention_matches_too(tokenizer):
    model = random_gpt(tokenizer.get_vocab_size(), seed=3, n_kv_head=2)
    prompt = prompt_ids(tokenizer, "Once upon a time")
    results, masks = Engine(model, tokenizer).generate_batch(prompt, max_tokens=12, temperature=0.0)
    expected = naive_greedy(model, prompt, 12)
    assert results[0][len(prompt):] == expected[: len(results[0]) - len(prompt)]
    assert masks[0] == [0] * len(prompt) + [1] * (len(results[0]) - len(prompt))


def test_rows_sample_independently_at_positive_temperature(tokenizer):
    engine = Engine(random_gpt(tokenizer.get_vocab_size()), tokenizer)
    columns = list(engine.generate(prompt_ids(tokenizer), num_samples=6, max_tokens=8, temperature=1.0))
    first = columns[0][0]
    assert len(set(first)) > 1, "every row got the same first token (broadcast)"
    rows = {tuple(column[i] for column, _ in columns) for i in range(6)}
    assert len(rows) == 6


def test_same_seed_same_output_other_seed_differs(tokenizer):
    engine = Engine(random_gpt(tokenizer.get_vocab_size()), tokenizer)
    prompt = prompt_ids(tokenizer)
    kw = {"num_samples": 2, "max_tokens": 10, "temperature": 0.9, "top_k": 50}
    a, _ = engine.generate_batch(prompt, seed=7, **kw)
    b, _ = engine.generate_batch(prompt, seed=7, **kw)
    c, _ = engine.generate_batch(prompt, seed=8, **kw)
    assert a == b
    assert a != c


def test_max_tokens_is_exact(tokenizer):
    a, b, c = tokenizer.encode("a"), tokenizer.encode("b"), tokenizer.encode("c")
    cycle = {a[0]: b[0], b[0]: c[0], c[0]: a[0]}  # never produces a stop token
    engine = Engine(chain_gpt(tokenizer.get_vocab_size(), cycle), tokenizer)
    for max_tokens in (0, 1, 7):
        steps = list(engine.generate(a, num_samples=2, max_tokens=max_tokens, temperature=0.0))
        assert len(steps) == max_tokens
    results, _ = engine.generate_batch(a, num_samples=1, max_tokens=7, temperature=0.0)
    assert results[0] == a + [b[0], c[0], a[0]] * 2 + [b[0]]
    # None: until the context (sequence_len 64) is full
    assert len(list(engine.generate(a, max_tokens=None, temperature=0.0))) == 64 - len(a)


def test_calculator_tool_output_is_forced_with_mask_zero(tokenizer):
    special = tokenizer.encode_special
    start, end = special("<|python_start|>"), special("<|python_end|>")
    out_start, out_end, stop = special("<|output_start|>"), special("<|output_end|>"), special("<|assistant_end|>")
    expr = tokenizer.encode("12*3")
    answer = tokenizer.encode("36")
    prompt = [tokenizer.get_bos_token_id(), special("<|assistant_start|>")]
    chain = [prompt[-1], start, *expr, end]
    assert len(set(chain)) == len(chain), "the chain must not repeat a token"
    transitions = dict(zip(chain, chain[1:], strict=False))
    transitions[out_end] = stop  # after the tool output the model ends its turn
    engine = Engine(chain_gpt(tokenizer.get_vocab_size(), transitions), tokenizer)
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    completion = [start, *expr, end, out_start, *answer, out_end]
    for result, mask in zip(results, masks, strict=True):
        assert result == prompt + completion
        assert mask == [0, 0] + [1] * (len(expr) + 2) + [0] * (len(answer) + 2)


def test_step_row_forces_nothing_for_a_rejected_expression(tokenizer):
    engine = Engine(random_gpt(tokenizer.get_vocab_size()), tokenizer)
    row = RowState(tokens=[])
    for token in [engine.python_start, *tokenizer.encode("__import__('os')"), engine.python_end]:
        assert engine.step_row(row, token) == (token, 1)
    assert not row.forced and not row.in_python
    assert engine.step_row(row, 5) == (5, 1)
    engine.step_row(row, engine.bos)
    assert row.completed


def test_generate_rejects_bad_requests(tokenizer):
    engine = Engine(random_gpt(tokenizer.get_vocab_size()), tokenizer)
    for kwargs, match in [({"tokens": []}, "non-empty"), ({"tokens": [10**6]}, "token ids"),
                          ({"tokens": [1], "temperature": -1.0}, "temperature"),
                          ({"tokens": [1], "top_k": -1}, "top_k"), ({"tokens": [1], "num_samples": 0}, "num_samples")]:
        with pytest.raises(ValueError, match=match):
            next(engine.generate(**kwargs))


def test_incremental_decoder_never_splits_a_character(tokenizer):
    text = "naïve café, 你好世界 🙂👍🏽 done"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode()) // 2, "test setup: a small vocab splits multi-byte characters"
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") > 0  # some tokens were held back until their character was complete
    broken = IncrementalDecoder(tokenizer)  # a reply cut inside a character still flushes what it has
    pieces = [broken.push(t) for t in tokenizer.encode("ok 🙂")[:-1]] + [broken.flush()]
    assert "".join(pieces).startswith("ok ") and "".join(pieces).endswith("\ufffd")


# -----------------------------------------------------------------------------
# calculator

@pytest.mark.parametrize("expr, value", [
    ("1+2*3", 7), ("(1 + 2) * 3", 9), ("12,000 / 4", 3000), ("7 // 2", 3), ("7 % 4", 3), ("-3 * -2", 6),
    ("2**10", 1024), ("2**-2", 0.25), ("1.5**2", 2.25), ("1/4", 0.25), ("10/3", 10 / 3),
    ("'strawberry'.count('r')", 3), ("\"banana\".count('an')", 2),
])
def test_calculator_evaluates_arithmetic_and_count(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "().__class__", "open('/etc/passwd')", "(1).real", "print(1)",
    "2**1000", "9**9**9", "10**20 * 10**20", "1e999", "'a' * 10", "x + 1", "[1, 2]", "lambda: 1", "1/0",
    "'a'.count('a', 0)", "'ab'.upper()", "True + 1", "1" * 300, "", "1 +", "2 ** 0.5", "2 ** 65",
])
def test_calculator_rejects_everything_else(expr):
    assert calculate(expr) is None


def test_calculator_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(calculate("6*7")))
    thread.start()
    thread.join()
    assert results == [42]
