"""Task data -> conversations: the chat eval sets (ARC, MMLU, GSM8K, HumanEval, SpellingBee) and the mid/SFT
training mixtures.

Every item is a conversation `{"messages": [{"role", "content"}, ...]}` that the tokenizer can render, plus
the fields an evaluator needs: multiple-choice items carry "letters" (the choice labels) and "answer" (the
correct letter); GSM8K and SpellingBee items carry "answer" (the final number as a string, commas stripped).

Loaders return rows in file order; shuffling is the caller's business and always goes through
random.Random(seed), so every mixture and every eval subset is reproducible. Data comes from
nanochat_core.data.sources (the NANOCHAT_DATA mirror, or the real Hugging Face files, same columns).
"""

from __future__ import annotations

import functools
import io
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

from nanochat_core.data.sources import (
    DataError,
    data_root,
    is_url,
    list_mirror,
    read_bytes,
    read_dataset,
    read_records,
    resolve,
    sft_sources,
)
from nanochat_core.progress import print0

ARC_SUBSETS = ("ARC-Easy", "ARC-Challenge")
ARC_SPLITS = ("train", "validation", "test")
MMLU_SPLITS = ("dev", "validation", "test")
MMLU_LETTERS = "ABCDEFGH"
GSM8K_SPLITS = ("train", "test")
CONVERSATION_SPLITS = ("train", "val")
CONVERSATION_VAL_EVERY = 20  # every 20th valid conversation is held out for validation loss
MIXTURES = ("mid", "sft")
GSM8K_ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_CALC_RE = re.compile(r"(<<[^>]+>>)")
CODE_BLOCK_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")


# -----------------------------------------------------------------------------
# multiple choice: ARC and MMLU

def render_mc(question: str, letters: list[str] | tuple[str, ...], choices: list[str]) -> str:
    """The multiple-choice prompt. The letter follows its choice after '=' with no space, so the prompt
    contains the very token ("A", not " A") that the answer uses."""
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices, strict=True))
    query += "\nRespond only with the letter of the correct answer."
    return query


def mc_conversation(question: str, letters: list[str], choices: list[str], answer: str, **extra: Any) -> dict:
    messages = [
        {"role": "user", "content": render_mc(question, letters, choices)},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "letters": list(letters), "answer": answer, **extra}


def arc(subset: str, split: str) -> list[dict]:
    """ARC-Easy / ARC-Challenge (HF ai2_arc schema: question, choices{text,label}, answerKey)."""
    _check_choice("ARC subset", subset, ARC_SUBSETS)
    _check_choice("ARC split", split, ARC_SPLITS)
    name = f"arc/{subset}/{split}.parquet"
    items = []
    for i, row in enumerate(read_dataset(name)):
        try:
            letters, choices, answer = row["choices"]["label"], row["choices"]["text"], row["answerKey"]
            question = row["question"]
        except (KeyError, TypeError) as e:
            raise DataError(f"{resolve(name)} row {i}: missing field {e}") from e
        if answer not in letters or len(letters) != len(choices):
            raise DataError(f"{resolve(name)} row {i}: answerKey {answer!r} not among labels {letters}")
        items.append(mc_conversation(question, letters, choices, answer, id=row.get("id")))
    return items


def _mmlu_items(name: str) -> list[dict]:
    items = []
    for i, row in enumerate(read_dataset(name)):
        if isinstance(row.get("train"), dict):  # HF auxiliary_train nests each row under "train"
            row = row["train"]
        try:
            question, choices, answer = row["question"], list(row["choices"]), int(row["answer"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{resolve(name)} row {i}: missing or bad field {e}") from e
        # MMLU has 4 choices; the ARC/OpenBookQA rows of the auxiliary set may have 3 or 5
        if not 2 <= len(choices) <= len(MMLU_LETTERS) or not 0 <= answer < len(choices):
            raise DataError(f"{resolve(name)} row {i}: expected 2-{len(MMLU_LETTERS)} choices and a valid answer "
                            f"index, got {row}")
        letters = list(MMLU_LETTERS[: len(choices)])
        items.append(mc_conversation(question, letters, choices, letters[answer], subject=row.get("subject")))
    return items


def mmlu(split: str) -> list[dict]:
    """MMLU 'all' (HF cais/mmlu schema: question, subject, choices, answer index)."""
    _check_choice("MMLU split", split, MMLU_SPLITS)
    return _mmlu_items(f"mmlu/all/{split}.parquet")


def mmlu_auxiliary_train() -> list[dict]:
    return _mmlu_items("mmlu/auxiliary_train/train.parquet")


# -----------------------------------------------------------------------------
# GSM8K

def extract_gsm8k_answer(text: str) -> str | None:
    """The number after '#### ' with commas stripped, or None if there is none."""
    match = GSM8K_ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def gsm8k_parts(answer: str) -> list[dict]:
    """Split a GSM8K solution into assistant parts: text, and for each <<expr=result>> a python part
    (the expression, which the model learns to write) and a python_output part (the result, forced in)."""
    parts = []
    for piece in GSM8K_CALC_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def gsm8k(split: str) -> list[dict]:
    """GSM8K main (question, answer with <<calc>> annotations and a final '#### N')."""
    _check_choice("GSM8K split", split, GSM8K_SPLITS)
    name = f"gsm8k/{split}.jsonl"
    items = []
    for i, row in enumerate(read_dataset(name)):
        question, solution = row.get("question"), row.get("answer")
        number = extract_gsm8k_answer(solution) if isinstance(solution, str) else None
        if not isinstance(question, str) or number is None:
            raise DataError(f"{resolve(name)} row {i}: expected a question and an answer ending in '#### N'")
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": gsm8k_parts(solution)},
        ]
        items.append({"messages": messages, "answer": number})
    return items


# -----------------------------------------------------------------------------
# HumanEval

def humaneval() -> list[dict]:
    """HumanEval's 164 problems: the user gives the function stub, the assistant answers with the whole function
    (stub + canonical solution). Items also carry "prompt", "test", "entry_point" and "answer" (the solution)."""
    name = "humaneval/HumanEval.jsonl.gz"
    items = []
    for i, row in enumerate(read_dataset(name)):
        fields = [row.get(k) for k in ("prompt", "canonical_solution", "test", "entry_point")]
        if not all(isinstance(f, str) and f for f in fields):
            raise DataError(f"{resolve(name)} row {i}: expected non-empty prompt, canonical_solution, test and "
                            f"entry_point strings")
        prompt, solution, test, entry_point = fields
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": prompt + solution}]
        items.append({"messages": messages, "prompt": prompt, "test": test, "entry_point": entry_point,
                      "answer": solution, "task_id": row.get("task_id")})
    return items


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (a completion that rewrites the function may drop them)."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_code(completion: str) -> str:
    """The first fenced code block of a completion, or the whole completion if it has none."""
    match = CODE_BLOCK_RE.search(completion)
    return match.group(1) if match else completion


def humaneval_program(item: dict, completion: str) -> str:
    """The program that passes iff the completion is right: prompt imports + code + tests + check(entry_point).
    As upstream grades it: the completion must define the function itself (a bare body fails), so the score
    compares with nanochat's published HumanEval figures."""
    code = extract_code(completion)
    return "\n\n".join([extract_imports(item["prompt"]), code, item["test"], f"check({item['entry_point']})\n"])


# -----------------------------------------------------------------------------
# general conversations (SmolTalk or the mirror's sft/*.jsonl)

def conversation_problem(row: Any) -> str | None:
    """Why a row is not a usable conversation, or None if it is: a messages list, an optional leading
    system message, then user/assistant strictly alternating, ending with the assistant, all non-empty text."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        return "no messages list"
    if not all(isinstance(m, dict) for m in messages):
        return "a message is not an object"
    turns = messages[1:] if messages[0].get("role") == "system" else messages
    if len(turns) < 2:
        return "needs at least one user and one assistant message"
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != expected:
            return f"message {i} has role {m.get('role')!r}, expected {expected!r}"
    if turns[-1]["role"] != "assistant":
        return "last message is not from the assistant"
    for m in messages:
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"empty or non-string content in a {m.get('role')!r} message"
    return None


def load_conversations(location: str) -> tuple[list[dict], int]:
    """Valid conversations of one file and the number of invalid rows skipped. No valid row is an error.
    A row is {"messages": [...]}, or the messages list itself (upstream's CustomJSON files)."""
    valid, skipped, first_problem = [], 0, None
    for i, row in enumerate(read_records(location, lists_allowed=True)):
        row = {"messages": row} if isinstance(row, list) else row
        problem = conversation_problem(row)
        if problem is None:
            valid.append({"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]})
        else:
            skipped += 1
            first_problem = first_problem or f"row {i}: {problem}"
    if not valid:
        raise DataError(f"{location}: no valid conversations ({skipped} rows skipped; first: {first_problem})")
    if skipped:
        print0(f"{location}: skipped {skipped} invalid conversation rows (first: {first_problem})")
    return valid, skipped


def smoltalk(split: str = "train") -> list[dict]:
    """Conversations from every sft_sources() file, validated; every 20th is held out as the "val" split."""
    _check_choice("conversation split", split, CONVERSATION_SPLITS)
    conversations = []
    for location in sft_sources():
        conversations.extend(load_conversations(location)[0])
    held_out = split == "val"
    return [c for i, c in enumerate(conversations) if (i % CONVERSATION_VAL_EVERY == 0) == held_out]


# -----------------------------------------------------------------------------
# SpellingBee and SimpleSpelling: synthetic spelling and letter counting

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORD_LIST_NAME = "words/words_alpha.txt"  # its path in a NANOCHAT_DATA mirror
SPELLING_SPLITS = ("train", "test")
TEST_SEED_OFFSET = 10_000_000  # test item i is seeded 10M + i, train item i is seeded i: disjoint (upstream #9777070)
MIN_WORD_COUNT = 3  # a word derived from the shards must occur this often (drops typos and one-off identifiers)
SHARD_WORD_RE = re.compile(r"(?<![A-Za-z0-9_'])[a-z]{3,}(?![A-Za-z0-9_'])")
LETTERS = string.ascii_lowercase
SPELLING_TEMPLATES = (
    "How many {letter} are in the word {word}", "How many {letter} are in {word}",
    "Count the number of {letter} in {word}", "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}", "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}", "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}", "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}", "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}", "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}", "Count all the {letter} in {word}", "How many times is {letter} in {word}",
    "Number of {letter} in {word}", "Total count of {letter} in {word}", "How many {letter} does {word} have",
    "How many {letter} does {word} contain", "What's the number of {letter} in {word}",
    "{word} has how many {letter}", "In {word}, count the {letter}", "How many {letter} appear in {word}",
    "Count the {letter} in {word}", "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}", "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    # Spanish, Chinese, Korean, French, German, Japanese
    "¿Cuántas {letter} hay en {word}?", "¿Cuántas veces aparece {letter} en {word}?", "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}", "{word}里有几个{letter}", "数一下{word}中的{letter}", "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요", "{word}에서 {letter}의 개수는", "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}", "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}", "Wie oft kommt {letter} in {word} vor", "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか", "{word}の中に{letter}がいくつ", "{word}に{letter}が何回出てくる",
)


def parse_word_list(data: bytes, location: str) -> tuple[str, ...]:
    """One word a line; only lowercase ASCII words are kept (words_alpha.txt is all of them)."""
    words = tuple(w for w in (line.strip() for line in data.decode("utf-8").splitlines())
                  if w.isascii() and w.isalpha() and w.islower())
    if not words:
        raise DataError(f"{location}: no words (expected one lowercase word a line)")
    return words


def words_from_shards(locations: list[str], min_count: int = MIN_WORD_COUNT) -> tuple[str, ...]:
    """Sorted lowercase alphabetic words of >= 3 letters that occur >= min_count times in the shards' text.
    A word glued to a capital, digit, underscore or apostrophe ("Python", "utf8", "sys_path", "don't") is
    not a word here, so identifiers and proper nouns mostly stay out."""
    import pyarrow.parquet as pq

    counts: Counter[str] = Counter()
    for location in locations:
        try:
            texts = pq.read_table(io.BytesIO(read_bytes(location)), columns=["text"]).column("text").to_pylist()
        except (KeyError, ValueError, OSError) as e:  # pyarrow: no text column / not parquet
            raise DataError(f"{location}: cannot read a 'text' column to derive the word list: {e}") from e
        for text in texts:
            counts.update(SHARD_WORD_RE.findall(text or ""))
    words = tuple(sorted(w for w, n in counts.items() if n >= min_count))
    if not words:
        raise DataError(f"no word occurs {min_count}+ times in {', '.join(locations)}")
    return words


@functools.lru_cache(maxsize=4)
def _word_list(root: str | None) -> tuple[str, ...]:
    if root is None:
        return parse_word_list(read_bytes(WORD_LIST_URL), WORD_LIST_URL)
    location = resolve(WORD_LIST_NAME)
    if is_url(root) or Path(location).is_file():
        return parse_word_list(read_bytes(location), location)
    shards = list_mirror("pretrain", ".parquet")
    if not shards:
        raise DataError(f"SpellingBee needs a word list: {location} does not exist and {root}/pretrain/ has no "
                        f"shards to derive one from")
    train_shards = shards[:-1] or shards  # the last shard is validation text: leave it unseen
    return words_from_shards([resolve(n) for n in train_shards])


def word_list() -> tuple[str, ...]:
    """The SpellingBee vocabulary.

    - NANOCHAT_DATA unset: upstream's dwyl words_alpha.txt (370K words), fetched from WORD_LIST_URL.
    - A mirror with words/words_alpha.txt: that file.
    - A local mirror without it (../shared/data has none): derived from the mirror's training shards (every
      shard but the last): the sorted lowercase words of >= 3 letters occurring >= MIN_WORD_COUNT times
      (about 21K words on ../shared/data). Deterministic: the same shards give the same list.
    Anything else is a DataError. Cached per data root for the life of the process."""
    return _word_list(data_root())


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an integer >= 0, got {size!r}")


def _item_seed(index: int, split: str) -> int:
    _check_choice("spelling split", split, SPELLING_SPLITS)
    return index if split == "train" else TEST_SEED_OFFSET + index


def spelling_bee_parts(word: str, letter: str) -> list[dict]:
    """The assistant's answer: spell the word, count the letter by hand, check with the python tool
    ('word'.count('l'), which the calculator evaluates), and end with '#### N'."""
    count = word.count(letter)
    manual = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach "
              f"first.\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\n"
              f"Then count the occurrences of '{letter}':\n")
    running = 0
    for i, char in enumerate(word, 1):
        if char == letter:
            running += 1
            manual += f"{i}:{char} hit! count={running}\n"  # "i:c" without a space: " a" is another token than "a"
        else:
            manual += f"{i}:{char}\n"
    manual += f"\nThis gives us {running}."
    return [
        {"type": "text", "text": manual},
        {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
    ]


def spelling_bee_item(words: tuple[str, ...] | list[str], seed: int) -> dict:
    """One "how many <letter> in <word>" conversation, fully determined by `seed` (upstream's draw order,
    so the same word list gives upstream's items)."""
    rng = random.Random(seed)
    word = rng.choice(words)
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # mostly a letter of the word
    template = rng.choice(SPELLING_TEMPLATES)
    if rng.random() < 0.3:
        template = template.lower()
    letter_quote, word_quote = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
    question = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
    if rng.random() < 0.5:
        question += "?"
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": spelling_bee_parts(word, letter)}]
    return {"messages": messages, "answer": str(word.count(letter)), "word": word, "letter": letter}


def spelling_bee(size: int = 1000, split: str = "train") -> list[dict]:
    """`size` SpellingBee items; item i of a split is the same on every call (seeded by i and the split)."""
    _check_size(size)
    _item_seed(0, split)
    words = word_list() if size else ()
    return [spelling_bee_item(words, _item_seed(i, split)) for i in range(size)]


def simple_spelling(size: int = 1000, split: str = "train") -> list[dict]:
    """`size` "Spell the word: X" -> "X:x,y,z" items, drawn from the word list in another order than SpellingBee."""
    _check_size(size)
    _item_seed(0, split)
    if not size:
        return []
    words = list(word_list())
    random.Random(42).shuffle(words)
    items = []
    for i in range(size):
        word = random.Random(_item_seed(i, split)).choice(words)
        messages = [{"role": "user", "content": f"Spell the word: {word}"},
                    {"role": "assistant", "content": f"{word}:{','.join(word)}"}]
        items.append({"messages": messages, "word": word})
    return items


# -----------------------------------------------------------------------------
# training mixtures

def proportional_quotas(sizes: list[int], limit: int) -> list[int]:
    """Split `limit` across sources in proportion to their sizes (largest remainder, ties to the earlier)."""
    total = sum(sizes)
    if limit >= total:
        return list(sizes)
    exact = [limit * n / total for n in sizes]
    quotas = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda k: (-(exact[k] - quotas[k]), k))
    for k in by_remainder[: limit - sum(quotas)]:
        quotas[k] += 1
    return quotas


def interleave(sources: list[list[dict]], seed: int, limit: int | None = None) -> list[dict]:
    """Deterministic shuffled interleave of several sources; `limit` takes from each in proportion."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    rng = random.Random(seed)
    sizes = [len(s) for s in sources]
    quotas = sizes if limit is None else proportional_quotas(sizes, limit)
    chosen = []
    for source, quota in zip(sources, quotas, strict=True):
        picks = range(len(source)) if quota == len(source) else sorted(rng.sample(range(len(source)), quota))
        chosen.extend(source[i] for i in picks)
    rng.shuffle(chosen)
    return chosen


# Upstream's spelling rows beside its conversations (SmolTalk): mid 200K SimpleSpelling + 80K SpellingBee beside
# 460K; SFT 300 + 300 beside 10K. We keep those ratios to our conversation count, capped at upstream's sizes: the
# real SmolTalk (460K) gets upstream's numbers, the mirror's ~2.6K conversations ~1.1K + 450 (mid), 79 + 79 (SFT).
SPELLING_MIX = {"mid": ((200_000, 80_000), 460_000), "sft": ((300, 300), 10_000)}
SFT_CONVERSATIONS = 10_000  # upstream's SFT takes SmolTalk train[:10K]: the task rows keep their share of the mix
# Conversations that teach the model its name and maker (upstream's CustomJSON), ~1K rows: twice in mid, once in SFT.
IDENTITY_REPEATS = {"mid": 2, "sft": 1}


def spelling_sizes(name: str, n_conversations: int) -> tuple[int, int]:
    """(SimpleSpelling, SpellingBee) rows of a mixture with n_conversations conversations."""
    _check_choice("mixture", name, MIXTURES)
    caps, per = SPELLING_MIX[name]
    return tuple(min(cap, round(n_conversations * cap / per)) for cap in caps)


def mixture_sources(name: str, split: str = "train", identity: str = "") -> list[list[dict]]:
    """The task lists that make up a mixture. Val: held-out conversations (+ MMLU/GSM8K test for mid).
    identity: a conversations file (path or URL) added IDENTITY_REPEATS[name] times to the training mixture."""
    _check_choice("mixture", name, MIXTURES)
    _check_choice("mixture split", split, CONVERSATION_SPLITS)
    if split == "val":
        return [smoltalk("val"), mmlu("test"), gsm8k("test")] if name == "mid" else [smoltalk("val")]
    conversations = smoltalk("train")
    if name == "sft":
        conversations = conversations[:SFT_CONVERSATIONS]
    n_simple, n_bee = spelling_sizes(name, len(conversations))
    spelling = [simple_spelling(n_simple), spelling_bee(n_bee)]
    identities = [load_conversations(identity)[0]] * IDENTITY_REPEATS[name] if identity else []
    if name == "mid":
        return [conversations, mmlu_auxiliary_train(), gsm8k("train"), *identities, *spelling]
    return [arc("ARC-Easy", "train"), arc("ARC-Challenge", "train"), gsm8k("train"), conversations, *identities,
            *spelling]


def mixture(name: str, seed: int = 42, limit: int | None = None, split: str = "train",
            identity: str = "") -> list[dict]:
    """The "mid" or "sft" training mixture as one deterministic, shuffled list of conversations.

    mid = conversations + MMLU auxiliary_train + GSM8K train (+ identity x2) + SimpleSpelling + SpellingBee;
    sft = ARC-Easy train + ARC-Challenge train + GSM8K train + conversations[:10K] (+ identity) + SimpleSpelling +
    SpellingBee (spelling sizes: see spelling_sizes). `limit` caps the total, taking from each source in
    proportion to its size. split="val" gives the matching validation mixture (held-out conversations; mid adds
    MMLU and GSM8K test).
    """
    return interleave(mixture_sources(name, split, identity), seed=seed, limit=limit)
