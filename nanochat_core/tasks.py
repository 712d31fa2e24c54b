"""Task data -> conversations: the chat eval sets (ARC, MMLU, GSM8K, HumanEval) and the mid/SFT training mixtures.

Every item is a conversation `{"messages": [{"role", "content"}, ...]}` that the tokenizer can render, plus
the fields an evaluator needs: multiple-choice items carry "letters" (the choice labels) and "answer" (the
correct letter); GSM8K items carry "answer" (the final number as a string, commas stripped).

Loaders return rows in file order; shuffling is the caller's business and always goes through
random.Random(seed), so every mixture and every eval subset is reproducible. Data comes from
nanochat_core.data.sources (the NANOCHAT_DATA mirror, or the real Hugging Face files, same columns).
"""

from __future__ import annotations

import random
import re
from typing import Any

from nanochat_core.common import print0
from nanochat_core.data.sources import DataError, read_dataset, read_records, resolve, sft_sources

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
    A completion that never defines the entry point is taken as the function body and appended to the stub."""
    code = extract_code(completion)
    if f"def {item['entry_point']}" not in code:
        code = item["prompt"] + code
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
    """Valid conversations of one file and the number of invalid rows skipped. No valid row is an error."""
    valid, skipped, first_problem = [], 0, None
    for i, row in enumerate(read_records(location)):
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


def mixture_sources(name: str, split: str = "train") -> list[list[dict]]:
    """The task lists that make up a mixture. Val: held-out conversations (+ MMLU/GSM8K test for mid)."""
    _check_choice("mixture", name, MIXTURES)
    _check_choice("mixture split", split, CONVERSATION_SPLITS)
    if split == "val":
        return [smoltalk("val"), mmlu("test"), gsm8k("test")] if name == "mid" else [smoltalk("val")]
    if name == "mid":
        return [smoltalk("train"), mmlu_auxiliary_train(), gsm8k("train")]
    return [arc("ARC-Easy", "train"), arc("ARC-Challenge", "train"), gsm8k("train"), smoltalk("train")]


def mixture(name: str, seed: int = 42, limit: int | None = None, split: str = "train") -> list[dict]:
    """The "mid" or "sft" training mixture as one deterministic, shuffled list of conversations.

    mid = conversations + MMLU auxiliary_train + GSM8K train; sft = ARC-Easy train + ARC-Challenge train
    + GSM8K train + conversations. `limit` caps the total, taking from each source in proportion to its size.
    split="val" gives the matching validation mixture (held-out conversations; mid adds MMLU and GSM8K test).
    """
    return interleave(mixture_sources(name, split), seed=seed, limit=limit)
