"""rustbpe against an obvious pure-Python BPE on real text, its splitter against fancy-regex and `regex`,
encoding against tiktoken (surrogates included), and its errors."""

import unicodedata
from collections import Counter
from itertools import pairwise

import pyarrow.parquet as pq
import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe
from nanochat_core.tokenizer import SPLIT_PATTERN


def read_texts(shared_data, shard: str, max_chars: int) -> list[str]:
    texts, chars = [], 0
    for text in pq.read_table(shared_data / "pretrain" / shard, columns=["text"]).column("text").to_pylist():
        texts.append(text)
        chars += len(text)
        if chars >= max_chars:
            break
    return texts


def reference_bpe(texts: list[str], num_merges: int, pattern: str = SPLIT_PATTERN) -> list[bytes]:
    """Textbook BPE: split with the regex, then repeatedly merge the most frequent pair (ties: smallest pair)
    everywhere, left to right. Returns the token byte strings in id order."""
    chunks = Counter(piece for text in texts for piece in regex.findall(pattern, text))
    words = {tuple(piece.encode("utf-8")): count for piece, count in chunks.items()}
    vocab = [bytes([i]) for i in range(256)]
    for new_id in range(256, 256 + num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return vocab


def trained(texts, vocab_size: int, pattern: str = SPLIT_PATTERN, **kw) -> rustbpe.Tokenizer:
    # nanochat's pattern, passed explicitly: the crate's default is GPT-4's (the wheel's)
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=pattern, **kw)
    return tok


def tiktoken_of(tok: rustbpe.Tokenizer) -> tiktoken.Encoding:
    return tiktoken.Encoding(name="t", pat_str=tok.get_pattern(), mergeable_ranks=dict(tok.get_mergeable_ranks()),
                             special_tokens={})


@pytest.fixture(scope="module")
def corpus(shared_data) -> list[str]:
    return read_texts(shared_data, "shard_00003.parquet", 80_000)


@pytest.fixture(scope="module")
def val_texts(shared_data) -> list[str]:
    return read_texts(shared_data, "shard_00011.parquet", 100_000)


def test_merges_equal_reference_on_real_text(corpus):
    num_merges = 120
    expected = reference_bpe(corpus, num_merges)
    assert len(expected) == 256 + num_merges  # the corpus has enough pairs: the comparison covers every merge
    for buffer_size in (8192, 7):  # buffering must not change the result
        tok = trained(corpus, 256 + num_merges, buffer_size=buffer_size)
        ranks = tok.get_mergeable_ranks()
        assert [rank for _, rank in ranks] == list(range(len(ranks)))
        assert [token for token, _ in ranks] == expected
        assert tok.vocab_size == len(expected)
        assert all(isinstance(token, bytes) for token, _ in ranks)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="aab c1\n🙂é", max_size=30), max_size=6), st.integers(0, 25))
def test_merges_equal_reference_on_random_text(texts, num_merges):
    # small alphabets give long runs ("aaaa"), many ties and early stops
    tok = trained(texts, 256 + num_merges)
    assert [token for token, _ in tok.get_mergeable_ranks()] == reference_bpe(texts, num_merges)


def test_ties_go_to_the_smallest_pair():
    # every pair occurs once: the first merge must be the smallest (a, b), here (" ", "c")
    tok = trained(["ab cd ef"], 257)
    assert tok.get_mergeable_ranks()[256] == (b" c", 256)


def test_encode_and_batch_encode_equal_tiktoken(corpus, val_texts):
    tok = trained(corpus, 256 + 300)
    enc = tiktoken_of(tok)
    texts = val_texts + ["", "   ", "naïve café 你好 🙂🙂 x²", "<|bos|> 12345678 \r\n\t done", "aaaaaaaaaaaaaaaa"]
    expected = enc.encode_ordinary_batch(texts)
    assert tok.batch_encode(texts) == expected
    assert [tok.encode(t) for t in texts] == expected
    assert [tok.decode(ids) for ids in expected] == texts
    assert tok.batch_decode(expected[:3]) == texts[:3]
    assert sum(map(len, expected)) < sum(len(t.encode()) for t in texts)  # the merges do compress


def test_default_and_custom_patterns():
    # no pattern: GPT-4's, as in the upstream wheel (a fresh tokenizer reports it too)
    tok = rustbpe.Tokenizer()
    assert tok.get_pattern() == rustbpe.GPT4_PATTERN
    tok.train_from_iterator(iter(["hello"]), 260)
    assert tok.get_pattern() == rustbpe.GPT4_PATTERN
    assert trained(["hello"], 260).get_pattern() == SPLIT_PATTERN == rustbpe.SPLIT_PATTERN
    tok = trained(["hello world hello"], 258, pattern=r"\w+|\s+")
    assert tok.get_pattern() == r"\w+|\s+"
    assert tok.encode("hello") == tiktoken_of(tok).encode_ordinary("hello")


def test_stops_early_when_pairs_run_out():
    tok = trained(["aaaa"], 1000)
    assert [t for t, _ in tok.get_mergeable_ranks()[256:]] == [b"aa", b"aaaa"]
    assert tok.vocab_size == 258


def test_empty_input_gives_byte_level_tokenizer():
    tok = trained([], 512)
    ranks = tok.get_mergeable_ranks()
    assert ranks == [(bytes([i]), i) for i in range(256)]
    assert tok.encode("hé") == list("hé".encode())


@pytest.mark.parametrize("vocab_size", [255, 0, -1])
def test_vocab_size_below_256_is_value_error(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        trained(["hello"], vocab_size)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="regex"):
        trained(["hello"], 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="buffer_size"):
        trained(["hello"], 300, buffer_size=0)


def test_iterator_exception_propagates_and_leaves_tokenizer_unchanged():
    class Boom(Exception):
        pass

    def texts():
        yield "hello hello"
        raise Boom("from the iterator")

    tok = trained(["ab ab ab"], 257)
    before = tok.get_mergeable_ranks()
    with pytest.raises(Boom, match="from the iterator"):
        tok.train_from_iterator(texts(), 300, buffer_size=1)
    with pytest.raises(TypeError, match="item 1 is int"):
        tok.train_from_iterator(iter(["ok", 3]), 300)
    with pytest.raises(TypeError):
        tok.train_from_iterator(42, 300)  # not iterable
    assert tok.get_mergeable_ranks() == before


def test_decode_errors():
    tok = trained(["hello"], 260)
    with pytest.raises(ValueError, match="unknown token id 999"):
        tok.decode([999])
    with pytest.raises(UnicodeDecodeError):
        tok.decode(list("🙂".encode())[:2])


# ---- the hand-written splitter


def check_splitter_on_code_points(code_points) -> None:
    """Each code point in a context that reaches every alternative of the pattern. fancy-regex (what
    tiktoken and upstream use) must agree everywhere; the `regex` package too, on the code points assigned
    in this Python's Unicode database (newer ones may be classed differently by another Unicode version)."""
    context = "a{0}b {0}{0}x'{0}1{0}22\n{0}  {0} ."
    compiled = regex.compile(SPLIT_PATTERN)
    chars = [chr(cp) for cp in code_points if not 0xD800 <= cp < 0xE000]
    for i in range(0, len(chars), 8192):
        block = chars[i:i + 8192]
        text = "\x00".join(context.format(c) for c in block)
        assert rustbpe._split(text, SPLIT_PATTERN) == rustbpe._split(text, SPLIT_PATTERN, reference=True), block[0]
        assigned = "\x00".join(context.format(c) for c in block if unicodedata.category(c) != "Cn")
        assert rustbpe._split(assigned, SPLIT_PATTERN) == compiled.findall(assigned), block[0]


def test_splitter_on_the_bmp_and_a_sample_of_the_other_planes():
    check_splitter_on_code_points([*range(0x10000), *range(0x10000, 0x110000, 17)])


@pytest.mark.slow
def test_splitter_on_every_code_point():  # (also done in Rust: cargo test --release)
    check_splitter_on_code_points(range(0x110000))


# characters that steer the pattern: apostrophes and contraction letters (ſ folds to s), letters, digits of
# several scripts, \s of several kinds, \r\n, punctuation, emoji
STEERING = list("'sSſdDmMtTlLvVeErR aé中ß٣²Ⅻ5 \t\n\r\x0b\x0c\x85\xa0\u2028\u3000.,!?-_🙂") + ["\r\n", "  "]
ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"))
fuzz_text = st.lists(st.one_of(st.sampled_from(STEERING), ASSIGNED), max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(fuzz_text)
def test_splitter_on_fuzzed_text(text):
    pieces = rustbpe._split(text, SPLIT_PATTERN)
    assert "".join(pieces) == text
    assert pieces == rustbpe._split(text, SPLIT_PATTERN, reference=True) == regex.findall(SPLIT_PATTERN, text)
    gpt4 = rustbpe.GPT4_PATTERN
    assert rustbpe._split(text, gpt4) == rustbpe._split(text, gpt4, reference=True) == regex.findall(gpt4, text)


def test_other_patterns_go_through_fancy_regex():
    assert rustbpe._split("ab12 cd", r"\d+|[a-z]") == ["a", "b", "12", "c", "d"]
    with pytest.raises(ValueError, match="regex"):
        rustbpe._split("x", "(unclosed")


# ---- encoding fuzzed text, surrogates included


@pytest.fixture(scope="module")
def small_tok(corpus) -> rustbpe.Tokenizer:
    return trained(corpus, 256 + 200)


@settings(max_examples=200, deadline=None)
@given(st.one_of(fuzz_text, st.text(max_size=40)))  # st.text() includes lone surrogates
def test_encode_round_trip_and_tiktoken_on_fuzzed_text(small_tok, text):
    enc = tiktoken_of(small_tok)
    ids = small_tok.encode(text)
    assert ids == enc.encode_ordinary(text)
    assert small_tok.batch_encode([text, text[::-1]]) == enc.encode_ordinary_batch([text, text[::-1]])
    # like tiktoken, a str that is not valid UTF-8 (lone surrogates) is encoded with them replaced
    expected = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert small_tok.decode(ids) == expected == enc.decode(ids)
    if not any("\ud800" <= c <= "\udfff" for c in text):
        assert expected == text


def test_surrogates_in_training_text_are_replaced_like_tiktoken():
    tok = trained(["x\ud800y \ud83d\ude00 \ud83d\ude00"], 256 + 10)
    assert tok.get_mergeable_ranks() == trained(["x\ufffdy 😀 😀"], 256 + 10).get_mergeable_ranks()


def test_encode_argument_errors(small_tok):
    with pytest.raises(TypeError):
        small_tok.encode(b"bytes")
    with pytest.raises(TypeError):
        small_tok.batch_encode("a str, not a list")
    with pytest.raises(ValueError, match="below 2\\*\\*32"):
        trained(["hello"], 2**32)
    assert trained(["hello"], 2**32 - 1).vocab_size == 260  # "as many merges as there are" is fine
    with pytest.raises(ValueError, match="regex split failed"):  # catastrophic backtracking, caught
        trained(["a" * 40 + "b"], 300, pattern=r"((a+)+)(?=c)")


def test_extension_is_built_for_the_stable_abi():
    # abi3: one wheel serves every CPython >= 3.10 (pyo3's abi3-py310 feature; maturin names the file so)
    assert ".abi3." in rustbpe.rustbpe.__file__
