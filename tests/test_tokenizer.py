"""nanochat_core.tokenizer: encoding, special tokens, chat rendering, files, and the tokenizer stage."""

import base64
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe
from nanochat_core import tok_eval
from nanochat_core.config import ConfigError
from nanochat_core.data.sources import DataError
from nanochat_core.tok_train import TokenizerConfig, train_bpe, train_tokenizer, training_texts
from nanochat_core.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, TokenizerError

TEXTS = ["Hello world!", "naïve café, 你好世界, emoji 🙂👍🏽 and \u200b zero width", "", "   \n\n\t  x",
         "numbers 1234567 3.14159", "def f(x):\n    return x ** 2\n"]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_dir)


@pytest.fixture
def shards_dir(shared_data, tmp_path):
    """Two train shards and the real validation shard (the last one), linked into a tmp dir."""
    d = tmp_path / "shards"
    d.mkdir()
    for i, name in enumerate(["shard_00000.parquet", "shard_00001.parquet", "shard_00011.parquet"]):
        (d / f"shard_{i:05d}.parquet").symlink_to(shared_data / "pretrain" / name)
    return d


def special(tok: Tokenizer, name: str) -> int:
    return tok.encode_special(name)


# ---- encoding


def test_round_trip_unicode_and_batch(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode(TEXTS, num_threads=1) == tok.encode(TEXTS)


def test_vocab_and_special_ids(tok):
    assert tok.get_vocab_size() == 512
    num_ranks = 512 - len(SPECIAL_TOKENS)
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(num_ranks, 512))
    assert tok.get_bos_token_id() == num_ranks
    assert tok.decode([special(tok, "<|assistant_end|>")]) == "<|assistant_end|>"
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("<|endoftext|>")


def test_special_strings_in_text_stay_ordinary(tok):
    text = "<|bos|>hi<|user_start|> <|assistant_end|>"
    ids = tok.encode(text)
    assert not set(ids) & {tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert max(ids) < tok.get_bos_token_id()
    assert tok.decode(ids) == text


def test_prepend_append(tok):
    bos, end = tok.get_bos_token_id(), special(tok, "<|assistant_end|>")
    body = tok.encode("hello")
    assert tok.encode("hello", prepend="<|bos|>", append=end) == [bos] + body + [end]
    assert tok.encode(["hello", ""], prepend=bos) == [[bos] + body, [bos]]
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="invalid token id"):
        tok.decode([10**6])


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype.is_floating_point is False and str(tb.dtype) == "torch.int32"
    assert tuple(tb.shape) == (tok.get_vocab_size(),)
    assert (tb[:256] == 1).all()
    assert (tb[tok.get_bos_token_id():] == 0).all()  # the special tokens count no bytes
    assert (tb[256:tok.get_bos_token_id()] >= 2).all()
    for text in TEXTS:  # per-token byte lengths add up to the text's UTF-8 length, even for split characters
        assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


# ---- chat rendering


def conversation():
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "It is 5."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}


def test_render_conversation_ids_and_mask(tok):
    s = {name: tok.encode_special(name) for name in SPECIAL_TOKENS}
    expected = [  # (ids, mask value) piece by piece, per the spec table
        ([s["<|bos|>"]], 0),
        ([s["<|user_start|>"]] + tok.encode("Be brief.\n\nWhat is 2+3?") + [s["<|user_end|>"]], 0),
        ([s["<|assistant_start|>"]], 0),
        (tok.encode("Let me compute. "), 1),
        ([s["<|python_start|>"]] + tok.encode("2+3") + [s["<|python_end|>"]], 1),
        ([s["<|output_start|>"]] + tok.encode("5") + [s["<|output_end|>"]], 0),
        (tok.encode("It is 5.") + [s["<|assistant_end|>"]], 1),
        ([s["<|user_start|>"]] + tok.encode("Thanks") + [s["<|user_end|>"], s["<|assistant_start|>"]], 0),
        (tok.encode("You're welcome.") + [s["<|assistant_end|>"]], 1),
    ]
    conv = conversation()
    ids, mask = tok.render_conversation(conv)
    assert ids == [i for piece, _ in expected for i in piece]
    assert mask == [m for piece, m in expected for _ in piece]
    assert conv == conversation()  # the input is not mutated
    short_ids, short_mask = tok.render_conversation(conv, max_tokens=7)
    assert (short_ids, short_mask) == (ids[:7], mask[:7])


def test_render_conversation_rejects_bad_structure(tok):
    msgs = conversation()["messages"]
    with pytest.raises(ValueError, match="message 3 has role 'assistant'"):
        tok.render_conversation({"messages": msgs[:3] + [msgs[2]]})
    with pytest.raises(ValueError, match="message 0 has role 'assistant'"):
        tok.render_conversation({"messages": msgs[2:]})
    with pytest.raises(ValueError, match="system message must be followed by a user"):
        tok.render_conversation({"messages": [msgs[0], msgs[2]]})
    with pytest.raises(ValueError, match="unknown part type 'image'"):
        tok.render_conversation({"messages": [msgs[1], {"role": "assistant", "content": [{"type": "image",
                                                                                       "text": "x"}]}]})
    with pytest.raises(ValueError, match="user content must be a str"):
        tok.render_conversation({"messages": [{"role": "user", "content": ["x"]}]})
    with pytest.raises(ValueError, match="non-empty 'messages'"):
        tok.render_conversation({"messages": []})


def test_render_for_completion(tok):
    conv = conversation()
    ids = tok.render_for_completion(conv)
    prompt, _ = tok.render_conversation({"messages": conv["messages"][:-1]})
    assert ids == prompt + [tok.encode_special("<|assistant_start|>")]
    assert conv == conversation()
    with pytest.raises(ValueError, match="last message is from the assistant"):
        tok.render_for_completion({"messages": conv["messages"][:-1]})


# ---- files


def test_save_load_equality(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.mergeable_ranks == tok.mergeable_ranks and again.pattern == tok.pattern == SPLIT_PATTERN
    assert again.encode(TEXTS) == tok.encode(TEXTS)
    lines = (tmp_path / "tokenizer.tiktoken").read_bytes().splitlines()  # tiktoken's "base64 rank" format
    assert [base64.b64decode(line.split()[0]) for line in lines[:3]] == [b"\x00", b"\x01", b"\x02"]
    assert [int(line.split()[1]) for line in lines] == list(range(len(lines)))
    assert "pickle" not in (tmp_path / "tokenizer.json").read_text()


def test_load_errors_name_the_file(tok, tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    ranks = tmp_path / "tokenizer.tiktoken"
    ranks.write_bytes(ranks.read_bytes()[:-10])
    with pytest.raises(TokenizerError, match="tokenizer.tiktoken"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.load(tmp_path)


def test_train_from_iterator_vocab_size(shared_data):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["hello"], 264)
    small = train_bpe(["hello world"] * 3, 265)  # bytes + specials, no merges
    assert small.get_vocab_size() == 265 and small.decode(small.encode("héllo")) == "héllo"
    assert rustbpe.SPLIT_PATTERN == SPLIT_PATTERN


# ---- the tokenizer stage


def test_train_tokenizer_stage(shards_dir, tmp_path):
    config = TokenizerConfig(vocab_size=600, max_chars=150_000, doc_cap=2_000)
    out = tmp_path / "tok"
    metrics = train_tokenizer(config, shards_dir, out)
    # what the tokenizer is, never how long it took: training it again must give the same artifact digest
    assert set(metrics) == {"vocab_size", "train_chars", "bytes_per_token", "gpt2_bytes_per_token",
                            "gpt4_bytes_per_token", "vs_gpt2_tokens_pct", "vs_gpt4_tokens_pct"}
    assert metrics["vocab_size"] == 600 and metrics["train_chars"] == 150_000
    assert json.loads((out / "metrics.json").read_text()) == metrics
    again = tmp_path / "again"
    train_tokenizer(config, shards_dir, again)
    for name in ("metrics.json", "tokenizer.json", "tokenizer.tiktoken", "tok_eval.md"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    trained = Tokenizer.load(out)
    assert trained.get_vocab_size() == 600
    # bytes/token is measured on the validation shard (the last one), which is smaller than VAL_EVAL_CHARS
    val = pq.read_table(shards_dir / "shard_00002.parquet").column("text").to_pylist()
    expected = sum(len(t.encode()) for t in val) / sum(map(len, trained.encode(val)))
    assert metrics["bytes_per_token"] == pytest.approx(expected, abs=1e-4)
    assert metrics["bytes_per_token"] > 1.5  # the merges compress
    # GPT-4's 100K vocab compresses better than a 600-token one; the table has a row per source + total
    assert metrics["gpt4_bytes_per_token"] > metrics["gpt2_bytes_per_token"] > metrics["bytes_per_token"]
    table = (out / "tok_eval.md").read_text()
    sources = set(pq.read_table(shards_dir / "shard_00002.parquet").column("source").to_pylist())
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == sources | {"domain", "total"}
    assert f"| {metrics['bytes_per_token']:.3f} |" in rows["total"]


def test_training_texts_respect_caps_and_skip_val(shards_dir):
    paths = sorted(shards_dir.glob("shard_*.parquet"))[:-1]
    stats = {}
    docs = list(training_texts(paths, max_chars=500_000, doc_cap=300, stats=stats))
    assert all(0 < len(d) <= 300 for d in docs)
    assert sum(map(len, docs)) == stats["chars"] == 500_000


def test_stage_cli_and_errors(shards_dir, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "nanochat_core.tok_train", "--shards", str(shards_dir), "--out", str(out),
           "--vocab-size", "300", "--max-chars", "20000"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["vocab_size"] == 300
    bad = subprocess.run(cmd[:-4] + ["--vocab-size", "10"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "vocab_size" in bad.stderr


def test_stage_data_errors(shards_dir, tmp_path):
    config = TokenizerConfig(vocab_size=300, max_chars=10_000)
    with pytest.raises(DataError, match="does not exist"):
        train_tokenizer(config, tmp_path / "missing", tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="0 shard"):
        train_tokenizer(config, tmp_path / "empty", tmp_path / "o2")
    (shards_dir / "shard_00000.parquet").unlink()
    (shards_dir / "shard_00000.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError, match="shard_00000.parquet"):
        train_tokenizer(config, shards_dir, tmp_path / "o3")
    with pytest.raises(ConfigError, match="doc_cap"):
        train_tokenizer(TokenizerConfig(doc_cap=0), shards_dir, tmp_path / "o4")


# ---- fuzzed text


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TOKENS + ["<|endoftext|>", "<|", "|>"])),
                max_size=8).map("".join))
def test_fuzzed_round_trip_and_specials_stay_ordinary(tok, text):
    ids = tok.encode(text)
    assert max(ids, default=0) < tok.get_bos_token_id()  # special-token strings never become special ids
    # lone surrogates are replaced as tiktoken does (U+FFFD); everything else comes back exactly
    assert tok.decode(ids) == text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert tok.encode([text, text]) == [ids, ids]
    bos = tok.get_bos_token_id()
    assert tok.encode(text, prepend="<|bos|>", append=bos) == [bos] + ids + [bos]  # ...unless asked for


def test_batch_encode_of_rustbpe_equals_the_tokenizer(shared_data):
    texts = pq.read_table(shared_data / "pretrain" / "shard_00011.parquet").column("text").to_pylist()[:300]
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts[:100]), 700, pattern=SPLIT_PATTERN)
    tok = Tokenizer(dict(bpe.get_mergeable_ranks()), bpe.get_pattern())
    assert bpe.batch_encode(texts) == tok.encode(texts)


# ---- tok_eval


def test_reference_encodings_are_gpt2_and_gpt4():
    refs = tok_eval.reference_encodings()
    assert refs["gpt2"].encode_ordinary("hello world") == [31373, 995]
    assert refs["gpt4"].encode_ordinary("hello world") == [15339, 1917]
    assert refs["gpt2"].n_vocab == 50257 and refs["gpt4"].n_vocab == 100258


def test_tok_eval_without_source_column_or_reference_ranks(tok, tmp_path, monkeypatch):
    shard = tmp_path / "val.parquet"
    pq.write_table(pa.table({"text": ["hello world", "naïve café", None]}), shard)
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))  # a mirror without tiktoken/
    metrics = tok_eval.evaluate(tok, shard, tmp_path, max_chars=10_000)
    assert set(metrics) == {"bytes_per_token"}
    table = (tmp_path / "tok_eval.md").read_text()
    assert "| all | 3 |" in table and "only our tokenizer is listed" in table
    assert metrics["bytes_per_token"] == pytest.approx(len("hello worldnaïve café".encode()) / sum(
        map(len, tok.encode(["hello world", "naïve café"]))), abs=1e-4)
    pq.write_table(pa.table({"text": ["", ""]}), shard)
    with pytest.raises(DataError, match="no text"):
        tok_eval.evaluate(tok, shard, None, max_chars=10_000)
