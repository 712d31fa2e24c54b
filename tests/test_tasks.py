"""Task loaders on the real data mirror: counts, prompt text, GSM8K tool parts, conversation validation, mixtures."""

import json

import pytest

from nanochat_core import tasks
from nanochat_core.data.sources import DataError


@pytest.mark.parametrize(
    "subset,split,count",
    [("ARC-Easy", "train", 2251), ("ARC-Easy", "test", 2376), ("ARC-Challenge", "train", 1119),
     ("ARC-Challenge", "validation", 299)],
)
def test_arc_counts(shared_data, subset, split, count):
    items = tasks.arc(subset, split)
    assert len(items) == count
    for item in items[:50]:
        assert item["answer"] in item["letters"]
        assert item["messages"][-1] == {"role": "assistant", "content": item["answer"]}


def test_mmlu_counts_and_letters(shared_data):
    assert len(tasks.mmlu("dev")) == 285
    test = tasks.mmlu("test")
    assert len(test) == 14042
    assert all(item["letters"] == ["A", "B", "C", "D"] for item in test)
    aux = tasks.mmlu_auxiliary_train()
    assert len(aux) == 8327
    # the auxiliary set mixes in ARC rows with 3 or 5 choices: letters follow the number of choices
    assert {len(item["letters"]) for item in aux} >= {3, 4, 5}
    assert all(item["answer"] in item["letters"] for item in aux)


def test_render_mc_exact_text():
    text = tasks.render_mc("What is 1+1?", ["A", "B", "C"], ["1", "2", "3"])
    assert text == (
        "Multiple Choice question: What is 1+1?\n"
        "- 1=A\n"
        "- 2=B\n"
        "- 3=C\n"
        "\nRespond only with the letter of the correct answer."
    )
    with pytest.raises(ValueError):
        tasks.render_mc("q", ["A", "B"], ["only one"])


def test_arc_first_row_prompt(shared_data):
    first = tasks.arc("ARC-Easy", "train")[0]
    assert first["messages"][0]["content"] == tasks.render_mc(
        "Which factor will most likely cause a person to develop a fever?",
        ["A", "B", "C", "D"],
        ["a leg muscle relaxing after exercise", "a bacterial population in the bloodstream",
         "several viral particles on the skin", "carbohydrates being digested in the stomach"],
    )
    assert first["answer"] == "B"


def test_gsm8k_parts_for_known_row(shared_data):
    items = tasks.gsm8k("train")
    assert len(items) == 7473 and len(tasks.gsm8k("test")) == 1319
    first = items[0]
    assert first["messages"][0]["content"].startswith("Natalia sold clips to 48 of her friends")
    assert first["answer"] == "72"
    assert first["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]


def test_gsm8k_parts_edge_cases():
    # a calculation whose expression itself contains '=' splits at the last one; no '=' -> empty output
    assert tasks.gsm8k_parts("<<a==b=1>>x<<7>>") == [
        {"type": "python", "text": "a==b"}, {"type": "python_output", "text": "1"},
        {"type": "text", "text": "x"},
        {"type": "python", "text": "7"}, {"type": "python_output", "text": ""},
    ]


@pytest.mark.parametrize(
    "text,expected",
    [("so #### 72", "72"), ("#### 1,234,567", "1234567"), ("#### -3.5 apples", "-3.5"), ("the answer is 5", None),
     ("#### 1\n#### 2", "1")],
)
def test_extract_gsm8k_answer(text, expected):
    assert tasks.extract_gsm8k_answer(text) == expected


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_invalid_conversations_are_skipped_and_counted(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with_system = {"messages": [{"role": "system", "content": "be nice"}, *good["messages"]]}
    bad = [
        {"messages": []},
        {"text": "no messages"},
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["part"]}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "dangling"}]},
    ]
    location = _write_jsonl(tmp_path / "mixed.jsonl", [good, *bad, with_system])
    valid, skipped = tasks.load_conversations(location)
    assert skipped == len(bad)
    assert valid == [good, with_system]


def test_file_without_valid_conversations_names_the_file(tmp_path):
    location = _write_jsonl(tmp_path / "allbad.jsonl", [{"messages": []}])
    with pytest.raises(DataError, match="allbad.jsonl"):
        tasks.load_conversations(location)
    with pytest.raises(DataError, match="missing.jsonl"):
        tasks.load_conversations(str(tmp_path / "missing.jsonl"))


def test_missing_mirror_file_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    with pytest.raises(DataError, match="gsm8k/train.jsonl"):
        tasks.gsm8k("train")


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="ARC-Easy"):
        tasks.arc("ARC-Medium", "train")
    with pytest.raises(ValueError, match="mid"):
        tasks.mixture("pretrain")


def test_smoltalk_split_is_disjoint(shared_data):
    train, val = tasks.smoltalk("train"), tasks.smoltalk("val")
    assert train and val
    val_texts = {json.dumps(c) for c in val}
    assert not any(json.dumps(c) in val_texts for c in train)
    total = sum(len(tasks.load_conversations(loc)[0]) for loc in tasks.sft_sources())
    assert len(train) + len(val) == total


def test_mixture_is_deterministic_and_limited(shared_data):
    full = tasks.mixture("sft")
    sizes = [len(s) for s in tasks.mixture_sources("sft")]
    assert len(full) == sum(sizes)
    a, b = tasks.mixture("sft", seed=7, limit=200), tasks.mixture("sft", seed=7, limit=200)
    assert len(a) == 200 and a == b
    assert tasks.mixture("sft", seed=8, limit=200) != a
    # proportional: every source contributes about its share of the total
    easy_ids = {x["id"] for x in tasks.arc("ARC-Easy", "train")}
    arc_easy = sum(1 for x in a if x.get("id") in easy_ids)
    assert abs(arc_easy - 200 * sizes[0] / sum(sizes)) <= 1
    # shuffled: the first items are not all from the first source
    assert len({type(x["messages"][-1]["content"]).__name__ + str("letters" in x) for x in a[:40]}) > 1


def test_proportional_quotas():
    assert tasks.proportional_quotas([10, 30], 4) == [1, 3]
    assert sum(tasks.proportional_quotas([7, 5, 3], 10)) == 10
    assert tasks.proportional_quotas([3, 4], 100) == [3, 4]
    assert tasks.proportional_quotas([3, 4], 0) == [0, 0]


# -----------------------------------------------------------------------------
# SpellingBee and SimpleSpelling

def assistant_text(parts: list[dict]) -> str:
    """The assistant turn as the Engine's output decodes: tool call and forced output in their special tokens."""
    wrap = {"python": "<|python_start|>{}<|python_end|>", "python_output": "<|output_start|>{}<|output_end|>"}
    return "".join(wrap.get(p["type"], "{}").format(p["text"]) for p in parts)


def test_word_list_is_derived_from_the_mirror_shards(shared_data):
    assert not (shared_data / tasks.WORD_LIST_NAME).exists()  # the mirror has no words_alpha.txt
    words = tasks.word_list()
    assert 10_000 < len(words) < 40_000 and list(words) == sorted(set(words))
    assert all(w.isascii() and w.isalpha() and w.islower() and len(w) >= 3 for w in words)
    assert {"the", "function", "president", "python"} <= set(words)
    shards = [str(p) for p in sorted((shared_data / "pretrain").glob("*.parquet"))[:-1]]
    assert tasks.words_from_shards(shards) == words  # deterministic: the train shards, >= MIN_WORD_COUNT times


def test_words_from_shards_rules(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = "The cat sat. the cat's cat_name isn't Python3 cat catx; ok cat mat mat mat utf8"
    pq.write_table(pa.table({"text": [text]}), tmp_path / "s.parquet")
    # "the" x1 and "The"/"cat's"/"cat_name"/"Python3"/"utf8" are not counted; "ok" is too short
    assert tasks.words_from_shards([str(tmp_path / "s.parquet")], min_count=2) == ("cat", "mat")
    with pytest.raises(DataError, match="no word occurs"):
        tasks.words_from_shards([str(tmp_path / "s.parquet")], min_count=10)


def test_word_list_file_in_the_mirror_wins_and_missing_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "words").mkdir()
    (tmp_path / "words" / "words_alpha.txt").write_text("apple\nbanana\n\nCherry\n")
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    assert tasks.word_list() == ("apple", "banana")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("NANOCHAT_DATA", str(empty))
    with pytest.raises(DataError, match="words_alpha.txt does not exist.*no shards"):
        tasks.spelling_bee(1)
    assert tasks.spelling_bee(0) == []  # no word list needed for nothing


def test_spelling_bee_items_are_deterministic_and_counted_right(shared_data):
    items = tasks.spelling_bee(200)
    assert items == tasks.spelling_bee(200)
    test = tasks.spelling_bee(200, "test")
    assert test == tasks.spelling_bee(200, "test")
    # upstream seeded test item i with -(i+1), the same stream as train item i+1; ours are disjoint
    assert all(t["messages"] != x["messages"] for t, x in zip(test, items[1:], strict=False))
    from nanochat_core.calculator import calculate

    for item in items + test:
        word, letter, answer = item["word"], item["letter"], item["answer"]
        user, assistant = item["messages"][0]["content"], item["messages"][1]["content"]
        assert answer == str(word.count(letter)) and word in user and letter in user
        text = assistant_text(assistant)
        assert f"{word}:{','.join(word)}" in text  # spelled out
        assert text.count(" hit! count=") == word.count(letter)  # the manual count
        python = next(p["text"] for p in assistant if p["type"] == "python")
        assert calculate(python) == word.count(letter)  # the Engine's calculator gives the same count
        assert tasks.extract_gsm8k_answer(text) == answer and text.endswith(f"#### {answer}")
    assert sum(i["letter"] not in i["word"] for i in items) > 0  # ~10% ask for a letter the word lacks
    assert len({i["messages"][0]["content"][:12] for i in items}) > 20  # many templates


def test_spelling_bee_renders_with_the_tool_masked(shared_data, tiny_tokenizer_dir):
    from nanochat_core.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_tokenizer_dir)
    item = tasks.spelling_bee(1)[0]
    ids, mask = tokenizer.render_conversation(item, max_tokens=10**6)
    out_start, out_end = tokenizer.encode_special("<|output_start|>"), tokenizer.encode_special("<|output_end|>")
    a, b = ids.index(out_start), ids.index(out_end)
    assert set(mask[a : b + 1]) == {0} and tokenizer.decode(ids[a + 1 : b]) == item["answer"]
    assert mask[ids.index(tokenizer.encode_special("<|python_start|>"))] == 1


def test_simple_spelling(shared_data):
    items = tasks.simple_spelling(50)
    assert items == tasks.simple_spelling(50) and items != tasks.simple_spelling(50, "test")
    for item in items:
        word = item["word"]
        assert item["messages"] == [{"role": "user", "content": f"Spell the word: {word}"},
                                    {"role": "assistant", "content": f"{word}:{','.join(word)}"}]
    with pytest.raises(ValueError, match="spelling split"):
        tasks.simple_spelling(1, "val")
    with pytest.raises(ValueError, match="size"):
        tasks.spelling_bee(-1)


def test_spelling_sizes_follow_upstream_ratios():
    assert tasks.spelling_sizes("mid", 460_000) == (200_000, 80_000)  # SmolTalk: upstream's sizes
    assert tasks.spelling_sizes("mid", 10**7) == (200_000, 80_000)  # capped
    assert tasks.spelling_sizes("sft", 460_000) == (300, 300)
    assert tasks.spelling_sizes("mid", 2619) == (1139, 455) and tasks.spelling_sizes("sft", 2619) == (79, 79)


def test_mixtures_include_spelling(shared_data):
    for name in tasks.MIXTURES:
        sources = tasks.mixture_sources(name)
        n_conversations = len(tasks.smoltalk("train")[:tasks.SFT_CONVERSATIONS if name == "sft" else None])
        simple, bee = sources[-2:]
        assert (len(simple), len(bee)) == tasks.spelling_sizes(name, n_conversations)
        assert simple[0]["messages"][0]["content"].startswith("Spell the word: ") and "letter" in bee[0]


def test_sft_takes_the_first_10k_conversations_like_upstream(shared_data, monkeypatch):
    """With the real SmolTalk (460K conversations) SFT must not train on all of it: upstream's mix is ARC + GSM8K
    + SmolTalk train[:10K] + 300 + 300 spelling rows, which keeps the task rows' share."""
    many = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(30_000)]
    monkeypatch.setattr(tasks, "smoltalk", lambda split="train": many)
    sources = tasks.mixture_sources("sft")
    conversations, simple, bee = sources[3], sources[-2], sources[-1]
    assert conversations == many[:10_000] and (len(simple), len(bee)) == (300, 300)
    assert len(tasks.mixture_sources("mid")[0]) == 30_000  # midtraining takes every conversation


def test_identity_conversations_join_mid_twice_and_sft_once(shared_data, tmp_path):
    """Upstream's CustomJSON format (each row the messages list itself) and {"messages": ...} rows both load."""
    identity = tmp_path / "identity.jsonl"
    rows = [[{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am nanochat."}],
            {"messages": [{"role": "user", "content": "Who made you?"}, {"role": "assistant", "content": "People."}]},
            [{"role": "assistant", "content": "not a conversation"}]]
    identity.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    expected = [{"messages": rows[0]}, rows[1]]
    mid = tasks.mixture_sources("mid", identity=str(identity))
    sft = tasks.mixture_sources("sft", identity=str(identity))
    assert [s for s in mid if s == expected] == [expected, expected] and [s for s in sft if s == expected] == [expected]
    assert len(mid) == len(tasks.mixture_sources("mid")) + 2 and len(sft) == len(tasks.mixture_sources("sft")) + 1
    assert tasks.mixture_sources("mid", split="val", identity=str(identity)) == tasks.mixture_sources("mid", "val")
    with pytest.raises(DataError, match="missing.jsonl"):
        tasks.mixture_sources("sft", identity=str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("line, problem", [
    (b"[1, 2]", "not a JSON object"), (b"42", "not a JSON object"), (b'"text"', "not a JSON object"),
    (b'{"question": "caf\xe9"}', "not valid UTF-8"), (b"{not json", "not valid JSON"),
])
def test_malformed_jsonl_line_names_the_file_and_line(tmp_path, monkeypatch, line, problem):
    good = json.dumps({"question": "1+1?", "answer": "2\n#### 2"}).encode()
    (tmp_path / "gsm8k").mkdir()
    path = tmp_path / "gsm8k" / "train.jsonl"
    path.write_bytes(b"\n".join([good, b"", good, line, good]) + b"\n")
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    with pytest.raises(DataError, match=problem) as e:
        tasks.gsm8k("train")
    assert f"{path}:4" in str(e.value)


def test_conversation_files_take_message_lists_but_not_scalars(tmp_path):
    """Upstream's CustomJSON rows are bare message lists; a number line is a broken file, not a conversation."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    location = _write_jsonl(tmp_path / "convs.jsonl", [messages, {"messages": messages}])
    assert tasks.load_conversations(location) == ([{"messages": messages}] * 2, 0)
    location = _write_jsonl(tmp_path / "scalar.jsonl", [{"messages": messages}, 7])
    with pytest.raises(DataError, match=r"scalar.jsonl:2 .*not a JSON object"):
        tasks.load_conversations(location)


def test_corrupt_gzip_names_the_file(tmp_path, monkeypatch):
    (tmp_path / "humaneval").mkdir()
    path = tmp_path / "humaneval" / "HumanEval.jsonl.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    with pytest.raises(DataError, match="not a readable gzip file") as e:
        tasks.humaneval()
    assert str(path) in str(e.value)
