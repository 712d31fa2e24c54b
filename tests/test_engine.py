"""The KV-cache engine against a cache-free greedy loop, sampling properties, the calculator tool, and the
calculator's safety. Models are tiny real GPTs: random ones, and a hand-wired one whose greedy output is a
chosen token chain (blocks are identity because init_weights zeroes their output projections, so the
logits depend only on the last token through wte and lm_head)."""

import random
import threading
import time
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanochat_core.calculator import calculate
from nanochat_core.engine import Engine, IncrementalDecoder, KVCache, RowState, sample_next_token
from nanochat_core.gpt import GPT, GPTConfig
from nanochat_core.serve.batching import (
    Job,
    Replica,
    SlotCache,
    decode,
    decode_padded,
    graph_batch_sizes,
    prefill,
    sample_rows,
)
from nanochat_core.tokenizer import Tokenizer


def random_gpt(vocab_size: int, seed: int = 0, n_kv_head: int = 1) -> GPT:
    """A small GPT with PyTorch's default (non-zero) init everywhere, so attention matters."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=n_kv_head,
                          n_embd=32))
    return model.eval()


def chain_gpt(vocab_size: int, transitions: dict[int, int], sequence_len: int = 64) -> GPT:
    """A GPT whose greedy next token after t is transitions[t] (for the tokens named there)."""
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                          n_embd=32))
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


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(ids=st.lists(st.integers(0, 255 + 200), max_size=40), text=st.text(max_size=30))
def test_incremental_decoder_adds_up_to_decode(tokenizer, ids, text):
    """Any token ids (invalid UTF-8 included) and any text: the deltas add up to decoding everything at once."""
    for tokens in (ids, tokenizer.encode(text)):
        decoder = IncrementalDecoder(tokenizer)
        deltas = [decoder.push(t) for t in tokens] + [decoder.flush()]
        assert "".join(deltas) == decoder.text == tokenizer.decode(tokens)


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


@pytest.mark.parametrize("expr, value", [
    ("'a,b'.count(',')", 1), ("\"1,000\".count(',')", 1), ("'a, b,c'.count(', ')", 1), ("'x'.count(',')", 0),
    ("1,000 + 'a,b'.count(',')", 1001), ("2,500,000 / 2,500", 1000),
])
def test_calculator_keeps_commas_inside_strings(expr, value):
    """Thousands separators are dropped from numbers only: a comma in a string literal is text."""
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", ["1,2", "(1, 2)", "1,0000", "'a'.count('a'), 1", "1,,000"])
def test_calculator_rejects_commas_that_are_not_thousands_separators(expr):
    assert calculate(expr) is None


def test_calculator_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(calculate("6*7")))
    thread.start()
    thread.join()
    assert results == [42]


# -----------------------------------------------------------------------------
# continuous batching (nanochat_core.serve.batching): rows at their own positions, joining and leaving

def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def run_jobs(replica: Replica, jobs: list[Job], hold: bool = True) -> list[tuple[list[int], str]]:
    """Submit jobs (all before the first step if `hold`); each job's (tokens, finish reason)."""
    out = {id(job): ([], []) for job in jobs}
    finished = threading.Semaphore(0)

    def emitter(job):
        def emit(kind, value):
            tokens, reason = out[id(job)]
            if kind == "token":
                tokens.append(value)
            else:
                reason.append(value)
                finished.release()
        return emit

    for job in jobs:
        job.emit = emitter(job)
    if hold:
        with replica.lock:
            for job in jobs:
                replica.submit(job)
    else:
        for job in jobs:
            replica.submit(job)
    for _ in jobs:
        assert finished.acquire(timeout=30)
    return [(out[id(job)][0], out[id(job)][1][0]) for job in jobs]


def test_batched_decode_matches_gpt_forward(tokenizer):
    model = random_gpt(tokenizer.get_vocab_size(), seed=4, n_kv_head=1)  # grouped-query attention too
    seqs = [prompt_ids(tokenizer, text) for text in ("Once upon a time there was", "Hi", "The capital of France")]
    cache = SlotCache(model.config, slots=4)
    with torch.inference_mode():
        for slot, seq in enumerate(seqs):
            expected = model(torch.tensor([seq[:-1]]))[:, -1]
            torch.testing.assert_close(prefill(model, cache, slot, seq[:-1]), expected, rtol=0, atol=1e-5)
        for _ in range(3):  # every row feeds one token at its own position
            pos = [len(seq) - 1 for seq in seqs]
            logits = decode(model, cache, [seq[p] for seq, p in zip(seqs, pos, strict=True)], pos)
            for row, seq in enumerate(seqs):
                expected = model(torch.tensor([seq[:pos[row] + 1]]))[0, -1]
                torch.testing.assert_close(logits[row], expected, rtol=0, atol=1e-5)
                seq.append(int(expected.argmax()))


def test_padded_decode_for_cuda_graphs_matches_decode(tokenizer):
    """decode_padded (static shapes: padding rows, attention over the whole cache under a mask) gives the real
    rows decode()'s logits and leaves their cache entries as decode() does (the graph path runs it on CUDA)."""
    model = random_gpt(tokenizer.get_vocab_size(), seed=5, n_kv_head=1)
    seqs = [prompt_ids(tokenizer, text) for text in ("Once upon a time there was", "Hi", "The capital of France")]
    caches = [SlotCache(model.config, slots=4) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            for slot, seq in enumerate(seqs):
                prefill(model, cache, slot, seq[:-1])
        for _ in range(3):
            pos = [len(seq) - 1 for seq in seqs]
            last = [seq[p] for seq, p in zip(seqs, pos, strict=True)]
            expected = decode(model, caches[0], last, pos)
            padded = decode_padded(model, caches[1], torch.tensor(last + [0]), torch.tensor(pos + [0]))
            assert padded.shape == (4, expected.size(1))
            torch.testing.assert_close(padded[:3], expected, rtol=0, atol=1e-5)
            for seq, row in zip(seqs, expected, strict=True):
                seq.append(int(row.argmax()))
        S = max(len(seq) for seq in seqs)
        torch.testing.assert_close(caches[1].k[:, :3, :, :S], caches[0].k[:, :3, :, :S], rtol=0, atol=1e-5)
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 32] and graph_batch_sizes(12) == [1, 2, 4, 8, 12]
    assert graph_batch_sizes(1) == [1]


def test_replica_rows_are_the_same_alone_or_batched(tokenizer):
    """Greedy and seeded sampling, different prompts and lengths: each row gets the same tokens alone, in a batch
    that starts together, or joining a running batch; greedy rows get what Engine.generate gives."""
    model = random_gpt(tokenizer.get_vocab_size())
    engine, replica = Engine(model, tokenizer), Replica(model, tokenizer, max_batch=3)  # 6 jobs: some queue
    specs = [("The capital of France is", 0.0, 12, 7), ("Hello", 0.9, 20, 1), ("2+2=", 1.0, 5, 2),
             ("Once upon a time", 0.0, 16, 3), ("abc", 1.5, 9, 4), ("Why?", 0.7, 14, 5)]

    def jobs():
        return [Job(prompt_ids(tokenizer, text), n, temperature=t, top_k=40, top_p=0.95, seed=seed)
                for text, t, n, seed in specs]

    alone = [run_jobs(replica, [job])[0] for job in jobs()]
    for (tokens, reason), job in zip(alone, jobs(), strict=True):
        if job.temperature == 0:
            steps = [column[0] for column, _ in engine.generate(job.prompt, 1, max_tokens=job.max_tokens,
                                                                 temperature=0.0)]
            stop = next((i for i, t in enumerate(steps) if t in (engine.assistant_end, engine.bos)), None)
            assert (tokens, reason) == ((steps, "length") if stop is None else (steps[:stop], "stop"))
    assert len({tuple(tokens) for tokens, _ in alone}) == len(alone)
    assert run_jobs(replica, jobs(), hold=True) == alone
    assert run_jobs(replica, jobs(), hold=False) == alone
    stats = replica.stats()
    assert stats["requests_served"] == 18 and stats["requests_active"] == stats["requests_queued"] == 0
    assert stats["decode_steps"] < stats["tokens_generated"]
    replica.close()


def test_sample_rows_per_row_settings():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(4, 1)
    rng = random.Random(0)
    settings_ = [(0.0, None, None), (1.0, 2, None), (1.0, 0, 0.5), (1.0, None, 0.8)]  # greedy, top-2, p .5, p .8
    seen = [set() for _ in settings_]
    for _ in range(400):
        picks = sample_rows(logits, *map(list, zip(*settings_, strict=True)), [rng.random() for _ in settings_])
        for s, pick in zip(seen, picks, strict=True):
            s.add(pick)
    assert seen == [{1}, {1, 3}, {1}, {1, 3}]
    free = Counter(sample_rows(logits[:1], [1.0], [None], [None], [rng.random()])[0] for _ in range(4000))
    expected = torch.softmax(logits[0], -1)  # p = .03, .64, .09, .24
    assert all(abs(free[i] / 4000 - expected[i].item()) < 0.03 for i in range(4))
    assert sample_rows(logits[:1], [1e-300], [None], [None], [0.99]) == [1]  # a tiny temperature is greedy


def test_replica_forces_calculator_output(tokenizer):
    special = tokenizer.encode_special
    start, end = special("<|python_start|>"), special("<|python_end|>")
    out_start, out_end, stop = special("<|output_start|>"), special("<|output_end|>"), special("<|assistant_end|>")
    expr, answer = tokenizer.encode("12*3"), tokenizer.encode("36")
    prompt = [tokenizer.get_bos_token_id(), special("<|assistant_start|>")]
    chain = [prompt[-1], start, *expr, end]
    transitions = dict(zip(chain, chain[1:], strict=False))
    transitions[out_end] = stop
    replica = Replica(chain_gpt(tokenizer.get_vocab_size(), transitions), tokenizer)
    results = run_jobs(replica, [Job(prompt, 30, temperature=0.0), Job(prompt, 4, temperature=0.0)])
    assert results == [([start, *expr, end, out_start, *answer, out_end], "stop"), ([start, *expr, end][:4], "length")]
    replica.close()


def test_cancel_frees_the_row_and_close_ends_the_rest(tokenizer):
    a, b, c = (tokenizer.encode(x)[0] for x in "abc")
    replica = Replica(chain_gpt(tokenizer.get_vocab_size(), {a: b, b: c, c: a}, 4096), tokenizer, max_batch=1)
    events, started = [], threading.Event()
    looping = Job([a], 4000, temperature=0.0, emit=lambda kind, value: (events.append(kind), started.set()))
    replica.submit(looping)
    assert started.wait(10)
    queued = Job([a], 5, temperature=0.0)
    with replica.lock:  # between two steps
        replica.submit(queued)
        assert replica.stats()["requests_queued"] == 1  # the only slot is taken
        replica.cancel(looping)
    wait_until(lambda: replica.stats()["requests_served"] == 1)
    stats = replica.stats()
    assert stats["requests_disconnected"] == 1 and stats["requests_active"] == 0
    assert "done" not in events and len(events) < 4000  # a cancelled job hears nothing more
    errors = []
    replica.submit(Job([a], 60, temperature=0.0, emit=lambda kind, value: errors.append(kind)))
    replica.close()
    assert errors[-1] == "error" and replica.stats()["requests_active"] == 0


def test_replica_never_samples_ids_past_the_tokenizer(tokenizer):
    vocab = tokenizer.get_vocab_size()
    model = random_gpt(vocab + 64)  # a padded lm_head: ids >= vocab have no text
    with torch.no_grad():
        model.lm_head.weight[vocab:] = 10.0 * model.lm_head.weight[:vocab].abs().max()  # and the model likes them
    replica = Replica(model, tokenizer)
    for tokens, _ in run_jobs(replica, [Job(prompt_ids(tokenizer), 10, temperature=t, seed=1) for t in (0.0, 1.0)]):
        assert tokens and max(tokens) < vocab
    replica.close()


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-30, 1e-8])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0 - 1e-6]]).repeat(50, 1)  # found by the API fuzzer
    rng = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, rng, temperature, top_k=3, top_p=0.5)[:, 0].tolist()) == {1}
