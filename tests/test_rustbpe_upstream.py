"""Our rustbpe against the upstream PyPI `rustbpe` wheel: byte-identical ranks on the shared pretraining text.

The wheel has the same import name as ours, so it lives in its own directory (`make install` puts it in
.venv/upstream-rustbpe; NANOCHAT_UPSTREAM_RUSTBPE overrides) and runs in a subprocess with that directory
first on sys.path. Both train on the tokenizer stage's documents (all train shards, each cropped to the
stage's doc_cap, at most max_chars) with the same split pattern. Trained with default arguments (no pattern),
both use GPT-4's pattern and give the same ranks: code written for the wheel runs unchanged on ours.
"""

import inspect
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import rustbpe
from nanochat_core.data.sources import find_shards
from nanochat_core.tok_train import TokenizerConfig, training_texts
from nanochat_core.tokenizer import SPLIT_PATTERN

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = Path(os.environ.get("NANOCHAT_UPSTREAM_RUSTBPE", REPO / ".venv" / "upstream-rustbpe")).resolve()
CASES = [(4096, "nanochat"), (32768, "nanochat"), (4096, "gpt4")]  # (vocab_size, split pattern)
# GPT-4's split pattern as the wheel's source writes it (its GPT4_PATTERN), written out here rather than taken
# from either rustbpe. (tiktoken 0.14 writes cl100k_base's differently, with more possessive quantifiers.)
GPT4_SPLIT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
              r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
DEFAULTS_CHARS, DEFAULTS_VOCAB = 300_000, 1024  # small: the default-arguments tests stay fast

# Runs in the subprocess: train upstream for every case, print {case: [token bytes as latin-1 str]}.
UPSTREAM_WORKER = textwrap.dedent("""
    import json, sys
    import rustbpe
    from nanochat_core.data.sources import find_shards
    from nanochat_core.tok_train import TokenizerConfig, training_texts
    from nanochat_core.tokenizer import SPLIT_PATTERN

    corpus, cases = sys.argv[1], json.loads(sys.argv[2])
    config = TokenizerConfig()
    texts = list(training_texts(find_shards(corpus)[:-1], config.max_chars, config.doc_cap, {}))
    out = {"file": rustbpe.__file__, "ranks": {}}
    for vocab_size, pattern in cases:
        tok = rustbpe.Tokenizer()
        # upstream's default pattern is GPT-4's: "gpt4" leaves it out, so the default is checked too
        kwargs = {"pattern": SPLIT_PATTERN} if pattern == "nanochat" else {}
        tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
        ranks = tok.get_mergeable_ranks()
        assert [rank for _, rank in ranks] == list(range(len(ranks)))
        out["ranks"][f"{vocab_size}-{pattern}"] = [bytes(token).decode("latin-1") for token, _ in ranks]
        out["pattern-" + pattern] = tok.get_pattern()
    print(json.dumps(out))
""")


# Runs in the subprocess: train upstream on many small corpora given as JSON on stdin.
UPSTREAM_SMALL_WORKER = textwrap.dedent("""
    import json, sys
    import rustbpe

    out = {"file": rustbpe.__file__, "ranks": []}
    for texts, vocab_size in json.load(sys.stdin):
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), vocab_size, pattern=sys.argv[1])
        out["ranks"].append([bytes(token).decode("latin-1") for token, _ in tok.get_mergeable_ranks()])
    print(json.dumps(out))
""")


# Runs in the subprocess: train upstream with default arguments (no buffer_size, no pattern) on the texts
# given as JSON on stdin; print its pattern, ranks and train_from_iterator's signature.
UPSTREAM_DEFAULTS_WORKER = textwrap.dedent("""
    import inspect, json, sys
    import rustbpe

    texts, vocab_size = json.load(sys.stdin)
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size)
    print(json.dumps({"file": rustbpe.__file__, "pattern": tok.get_pattern(),
                      "ranks": [bytes(token).decode("latin-1") for token, _ in tok.get_mergeable_ranks()],
                      "signature": str(inspect.signature(rustbpe.Tokenizer.train_from_iterator))}))
""")


def run_upstream(code: str, args: list[str], stdin: str = "") -> dict:
    if not (UPSTREAM / "rustbpe").is_dir():
        pytest.fail(f"the upstream rustbpe wheel is not installed in {UPSTREAM}: run `make install` "
                    f"(or `uv pip install --target {UPSTREAM} rustbpe`)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(UPSTREAM), str(REPO)]), "RAYON_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code, *args], input=stdin, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    # the subprocess must really have run the wheel, not our extension
    assert Path(out["file"]).resolve().is_relative_to(UPSTREAM), out["file"]
    return out


@pytest.fixture(scope="module")
def corpus(shared_data) -> Path:
    return shared_data / "pretrain"


@pytest.fixture(scope="module")
def upstream(corpus) -> dict:
    return run_upstream(UPSTREAM_WORKER, [str(corpus), json.dumps(CASES)])


@pytest.fixture(scope="module")
def texts(corpus) -> list[str]:
    config = TokenizerConfig()
    return list(training_texts(find_shards(corpus)[:-1], config.max_chars, config.doc_cap, {}))


def test_upstream_patterns_are_ours(upstream):
    assert upstream["pattern-nanochat"] == SPLIT_PATTERN
    assert upstream["pattern-gpt4"] == rustbpe.GPT4_PATTERN


@pytest.mark.parametrize("vocab_size,pattern", CASES)
def test_ranks_identical_to_upstream(upstream, texts, vocab_size, pattern):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size,
                            pattern=SPLIT_PATTERN if pattern == "nanochat" else rustbpe.GPT4_PATTERN)
    ours = [token for token, _ in tok.get_mergeable_ranks()]
    theirs = [token.encode("latin-1") for token in upstream["ranks"][f"{vocab_size}-{pattern}"]]
    assert len(ours) == len(theirs) == vocab_size  # the text has enough pairs for every merge
    first_difference = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    assert first_difference is None, (first_difference, ours[first_difference], theirs[first_difference])


def test_ranks_identical_to_upstream_on_many_small_corpora():
    # small alphabets give long runs ("aaaa"), many ties between pairs and early stops: where tie-breaking
    # and the bookkeeping of overlapping merges would show
    rng = random.Random(0)
    alphabets = ["ab", "aab c", "ab c1\n'sé🙂", "xyz  \t\n"]
    jobs = []
    for _ in range(300):
        alphabet = rng.choice(alphabets)
        texts = ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(rng.randint(0, 6))]
        jobs.append((texts, 256 + rng.randint(0, 60)))
    theirs = run_upstream(UPSTREAM_SMALL_WORKER, [SPLIT_PATTERN], json.dumps(jobs))["ranks"]
    for (texts, vocab_size), expected in zip(jobs, theirs, strict=True):
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), vocab_size, pattern=SPLIT_PATTERN)
        assert [token.decode("latin-1") for token, _ in tok.get_mergeable_ranks()] == expected, (texts, vocab_size)


@pytest.fixture(scope="module")
def defaults_texts(corpus) -> list[str]:
    # the tokenizer stage's documents, only the first DEFAULTS_CHARS characters (all from the first shard)
    return list(training_texts(find_shards(corpus)[:-1], DEFAULTS_CHARS, TokenizerConfig().doc_cap, {}))


@pytest.fixture(scope="module")
def upstream_defaults(defaults_texts) -> dict:
    return run_upstream(UPSTREAM_DEFAULTS_WORKER, [], json.dumps([defaults_texts, DEFAULTS_VOCAB]))


def test_default_pattern_is_gpt4(upstream_defaults, defaults_texts):
    assert upstream_defaults["pattern"] == GPT4_SPLIT
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(defaults_texts), DEFAULTS_VOCAB)
    assert tok.get_pattern() == GPT4_SPLIT == rustbpe.GPT4_PATTERN


def test_default_training_identical_to_upstream(upstream_defaults, defaults_texts):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(defaults_texts), DEFAULTS_VOCAB)
    assert tok.get_pattern() == upstream_defaults["pattern"]
    ours = [token for token, _ in tok.get_mergeable_ranks()]
    theirs = [token.encode("latin-1") for token in upstream_defaults["ranks"]]
    assert len(ours) == len(theirs) == DEFAULTS_VOCAB  # the text has enough pairs for every merge
    first_difference = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    assert first_difference is None, (first_difference, ours[first_difference], theirs[first_difference])


def test_train_from_iterator_signature_is_upstreams(upstream_defaults):
    # same parameter names and defaults, so keyword calls and inspect-based tooling see one API
    assert str(inspect.signature(rustbpe.Tokenizer.train_from_iterator)) == upstream_defaults["signature"]
