"""Chat eval on a tiny random-init GPT and a tiny trained tokenizer: config checks, the categorical scoring
path checked by hand, GSM8K and SpellingBee answer matching, ChatCORE's task list, the full evaluate() and the
stage CLI."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from nanochat_core import chat_eval, tasks
from nanochat_core.chat_eval import ChatEvalConfig
from nanochat_core.config import ConfigError, config_from_dict
from nanochat_core.gpt import GPT, config_for_depth

SEQ_LEN = 256


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(config_for_depth(1, tokenizer.get_vocab_size(), SEQ_LEN))
    gpt.init_weights()
    return gpt.eval()


# -----------------------------------------------------------------------------
# config

def test_unknown_task_lists_valid_ones():
    with pytest.raises(ConfigError, match="ARC-Easy, ARC-Challenge, MMLU, GSM8K"):
        config_from_dict(ChatEvalConfig, {"tasks": "ARC-Easy,HellaSwag"})
    with pytest.raises(ConfigError, match="max_per_task"):
        config_from_dict(ChatEvalConfig, {"max_per_task": 0})
    with pytest.raises(ConfigError, match="twice"):
        config_from_dict(ChatEvalConfig, {"tasks": "MMLU,MMLU"})
    assert config_from_dict(ChatEvalConfig, {"tasks": " MMLU , GSM8K "}).task_names() == ["MMLU", "GSM8K"]


def test_eval_subset_is_seeded():
    items = [{"i": i} for i in range(100)]
    a = chat_eval.eval_subset(items, 10, seed=1)
    assert a == chat_eval.eval_subset(items, 10, seed=1) and len(a) == 10
    assert a != chat_eval.eval_subset(items, 10, seed=2)
    assert sorted(x["i"] for x in chat_eval.eval_subset(items, -1, seed=1)) == list(range(100))


# -----------------------------------------------------------------------------
# GSM8K answers

@pytest.mark.parametrize(
    "completion,correct",
    [("3 + 4 = 7.\n#### 7", True), ("#### 7,000", False), ("The answer is 7", False), ("#### 70", False),
     ("<|python_start|>3+4<|python_end|><|output_start|>7<|output_end|> so #### 7", True)],
)
def test_gsm8k_is_correct(completion, correct):
    assert chat_eval.gsm8k_is_correct({"answer": "7"}, completion) is correct


def test_gsm8k_comma_answers_match():
    assert chat_eval.gsm8k_is_correct({"answer": "7000"}, "#### 7,000")


def test_generation_budget_fits_the_context():
    assert chat_eval.generation_budget(list(range(10)), 50, 256) == (list(range(10)), 50)
    assert chat_eval.generation_budget(list(range(240)), 50, 256) == (list(range(240))[-206:], 50)
    prompt, budget = chat_eval.generation_budget(list(range(300)), 512, 256)
    assert prompt == list(range(300))[-128:] and budget == 128


# -----------------------------------------------------------------------------
# categorical scoring, by hand

def test_categorical_prompt_and_letter_restriction(model, tokenizer, shared_data):
    conversation = tasks.arc("ARC-Easy", "test")[0]
    prompt = chat_eval.categorical_prompt(tokenizer, conversation, SEQ_LEN)
    special = tokenizer.encode_special
    expected = ([tokenizer.get_bos_token_id(), special("<|user_start|>")]
                + tokenizer.encode(conversation["messages"][0]["content"])
                + [special("<|user_end|>"), special("<|assistant_start|>")])
    assert prompt == expected
    assert prompt[-1] == special("<|assistant_start|>")

    letter_ids = chat_eval.letter_token_ids(tokenizer, conversation["letters"])
    assert letter_ids == [tokenizer.encode(letter)[0] for letter in conversation["letters"]]
    with torch.no_grad():
        last = model(torch.tensor([prompt]))[0, -1]
    assert last.shape == (tokenizer.get_vocab_size(),)
    by_hand = conversation["letters"][int(last[letter_ids].argmax())]
    assert chat_eval.predict_letters(model, tokenizer, [conversation]) == [by_hand]


def test_right_padding_does_not_change_predictions(model, tokenizer, shared_data):
    conversations = tasks.arc("ARC-Challenge", "test")[:4]
    assert len({len(tokenizer.render_for_completion(c)) for c in conversations}) > 1  # really padded
    batched = chat_eval.predict_letters(model, tokenizer, conversations)
    single = [chat_eval.predict_letters(model, tokenizer, [c])[0] for c in conversations]
    assert batched == single
    assert all(p in c["letters"] for p, c in zip(batched, conversations, strict=True))


# -----------------------------------------------------------------------------
# the whole evaluation

def test_evaluate_tiny_model(model, tokenizer, shared_data):
    config = ChatEvalConfig(tasks="ARC-Easy,MMLU,GSM8K", max_per_task=4, batch_size=3, max_new_tokens=8)
    results = chat_eval.evaluate(config, model, tokenizer)
    assert results["ChatCORE_tasks"] == ["ARC-Easy", "MMLU", "GSM8K"]
    for name, r in results["tasks"].items():
        assert r["n"] == 4 and 0 <= r["correct"] <= 4
        assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy"] == r["correct"] / 4
        baseline = chat_eval.BASELINES[name]
        assert r["centered"] == pytest.approx((r["accuracy"] - baseline) / (1 - baseline))
        assert r["samples"] and all(s["completion"] is not None for s in r["samples"])
    mean = sum(r["centered"] for r in results["tasks"].values()) / 3
    assert results["ChatCORE"] == pytest.approx(mean)
    assert all(s["completion"] in ("A", "B", "C", "D") for s in results["tasks"]["MMLU"]["samples"])


def test_spelling_bee_runs_beside_chatcore_not_in_it(model, tokenizer, shared_data):
    assert chat_eval.CHATCORE_TASKS == ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
    assert "SpellingBee" in chat_eval.VALID_TASKS and chat_eval.BASELINES["SpellingBee"] == 0.0
    config = ChatEvalConfig(tasks="SpellingBee,ARC-Easy", max_per_task=3, max_new_tokens=6)
    results = chat_eval.evaluate(config, model, tokenizer)
    bee = results["tasks"]["SpellingBee"]
    assert bee["n"] == 3 and bee["baseline"] == 0.0 and bee["centered"] == bee["accuracy"]
    assert all(s["answer"].isdigit() and isinstance(s["completion"], str) for s in bee["samples"])
    assert results["ChatCORE_tasks"] == ["ARC-Easy"]
    assert results["ChatCORE"] == pytest.approx(results["tasks"]["ARC-Easy"]["centered"])
    metrics = chat_eval.flat_metrics(results)
    assert set(metrics) == {"SpellingBee", "ARC-Easy", "ChatCORE"}
    only = chat_eval.evaluate(ChatEvalConfig(tasks="SpellingBee", max_per_task=1, max_new_tokens=2), model, tokenizer)
    assert only["ChatCORE"] is None and only["ChatCORE_tasks"] == []  # no ChatCORE task ran: no ChatCORE
    assert chat_eval.flat_metrics(only) == {"SpellingBee": only["tasks"]["SpellingBee"]["accuracy"]}


def test_spelling_bee_answers_are_checked_like_gsm8k(shared_data):
    items = chat_eval.load_task("SpellingBee")
    assert len(items) == chat_eval.SPELLING_BEE_SIZE == 256 and items == tasks.spelling_bee(256, "test")
    check = chat_eval.GENERATIVE_CHECKS["SpellingBee"]
    item = items[0]
    # the reference answer as the Engine would decode it (tool call and forced output included) is right
    wrap = {"python": "<|python_start|>{}<|python_end|>", "python_output": "<|output_start|>{}<|output_end|>"}
    reference = "".join(wrap.get(p["type"], "{}").format(p["text"]) for p in item["messages"][1]["content"])
    assert check(item, reference)
    assert not check(item, reference.replace(f"#### {item['answer']}", f"#### {int(item['answer']) + 1}"))
    assert not check(item, f"The answer is {item['answer']}")  # no '#### N': no answer


@pytest.mark.parametrize("max_per_task", [1, 2, 300])
def test_max_per_task_of_any_size(model, tokenizer, shared_data, max_per_task):
    """Fewer items than asked for, or just one: every count is right."""
    assert len(chat_eval.eval_subset(chat_eval.load_task("SpellingBee"), max_per_task, 42)) == min(max_per_task, 256)
    if max_per_task > 2:
        return  # running 256 generations adds nothing here
    results = chat_eval.evaluate(ChatEvalConfig(tasks="MMLU,SpellingBee", max_per_task=max_per_task,
                                                max_new_tokens=2), model, tokenizer)
    assert [r["n"] for r in results["tasks"].values()] == [max_per_task, max_per_task]


def test_fewer_items_than_ranks(model, tiny_tokenizer_dir, tmp_path, shared_data):
    """max_per_task=1 under 2 ranks: rank 1 has nothing to do but still joins the count."""
    save_tiny_model(model, tmp_path / "model")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nanochat_core.chat_eval", "--model", str(tmp_path / "model"), "--tokenizer", str(tiny_tokenizer_dir),
           "--tasks", "ARC-Easy,SpellingBee", "--max-per-task", "1", "--max-new-tokens", "2", "--device-type", "cpu",
           "--out", str(tmp_path / "out")]
    subprocess.run(cmd, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["n"] for r in results["tasks"].values()] == [1, 1]
    assert results["ChatCORE_tasks"] == ["ARC-Easy"]


def test_evaluate_task_rejects_unknown_names(model, tokenizer):
    with pytest.raises(ConfigError, match="SpellingBee"):
        chat_eval.evaluate_task(ChatEvalConfig(), "Spelling", model, tokenizer)


def test_prompts_longer_than_the_context_are_cropped_and_counted(tokenizer, shared_data):
    torch.manual_seed(0)
    short = GPT(config_for_depth(1, tokenizer.get_vocab_size(), 32))
    short.init_weights()
    config = ChatEvalConfig(tasks="ARC-Easy,GSM8K", max_per_task=2, max_new_tokens=64)
    results = chat_eval.evaluate(config, short.eval(), tokenizer)
    for r in results["tasks"].values():
        assert r["n"] == 2 and r["cropped"] == 2  # every prompt is longer than 32 tokens
    assert results["tasks"]["ARC-Easy"]["samples"][0]["completion"] in ("A", "B", "C", "D")


def save_tiny_model(model, directory) -> None:
    from nanochat_core.checkpoint import save_final_model

    save_final_model(directory, model, {"model_config": asdict(model.config), "step": 0})


def test_stage_cli_writes_results_and_metrics(model, tokenizer, tiny_tokenizer_dir, tmp_path, shared_data):
    save_tiny_model(model, tmp_path / "model")
    out = tmp_path / "out"
    chat_eval.main(["--model", str(tmp_path / "model"), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out),
                    "--tasks", "ARC-Easy,GSM8K", "--max-per-task", "2", "--max-new-tokens", "4",
                    "--device-type", "cpu"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"ARC-Easy", "GSM8K", "ChatCORE"}
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["ARC-Easy"]["n"] == 2 and results["tasks"]["GSM8K"]["n"] == 2
    assert results["tasks"]["ARC-Easy"]["accuracy"] == metrics["ARC-Easy"]
    assert results["config"]["max_per_task"] == 2


def test_stage_cli_rejects_unknown_task(tmp_path):
    with pytest.raises(ConfigError, match="valid tasks"):
        chat_eval.main(["--model", str(tmp_path), "--tokenizer", str(tmp_path), "--out", str(tmp_path),
                        "--tasks", "SQuAD"])


@pytest.mark.slow
def test_two_ranks_match_one_rank(model, tiny_tokenizer_dir, tmp_path, shared_data):
    """Striding items across ranks and all-reducing the counts gives the single-process numbers."""
    save_tiny_model(model, tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--tokenizer", str(tiny_tokenizer_dir), "--tasks", "ARC-Easy,GSM8K",
            "--max-per-task", "5", "--max-new-tokens", "4", "--device-type", "cpu"]
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"out{world}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "nanochat_core.chat_eval", *args, "--out", str(out)]
        subprocess.run(cmd, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        runs[world] = json.loads((out / "results.json").read_text())["tasks"]
    for name in ("ARC-Easy", "GSM8K"):
        assert runs[2][name]["n"] == runs[1][name]["n"] == 5
        assert runs[2][name]["correct"] == runs[1][name]["correct"]


# -----------------------------------------------------------------------------
# HumanEval: the check path is proven on the dataset's own solutions

@pytest.fixture(scope="module")
def humaneval_items(shared_data) -> dict[str, dict]:
    return {item["task_id"]: item for item in tasks.humaneval()}


def test_humaneval_items(humaneval_items):
    assert len(humaneval_items) == 164
    item = humaneval_items["HumanEval/0"]
    assert item["entry_point"] == "has_close_elements" and "def check(candidate)" in item["test"]
    assert item["messages"][1]["content"] == item["prompt"] + item["answer"]
    assert tasks.extract_imports(item["prompt"]) == "from typing import List"


def test_extract_code_takes_the_first_fenced_block():
    assert tasks.extract_code("Here:\n```python\ndef f():\n    return 1\n```\nand ```py\nx\n```") == (
        "def f():\n    return 1\n")
    assert tasks.extract_code("```\nprint(2)\n```") == "print(2)\n"
    assert tasks.extract_code("def f(): return 3") == "def f(): return 3"


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/32", "HumanEval/162"])  # typing, math, hashlib
def test_humaneval_canonical_solution_passes_and_wrong_one_fails(humaneval_items, task_id):
    item = humaneval_items[task_id]
    fenced = f"Sure:\n```python\n{item['prompt']}{item['answer']}```\nDone."
    assert chat_eval.humaneval_is_correct(item, fenced)
    assert not chat_eval.humaneval_is_correct(item, item["answer"])  # a bare body does not count (as upstream)
    assert not chat_eval.humaneval_is_correct(item, f"```python\n{item['prompt']}    return None\n```")
    other = humaneval_items["HumanEval/1"]
    assert not chat_eval.humaneval_is_correct(item, other["prompt"] + other["answer"])  # never defines entry point


GAMING_TRICKS = {  # each ends the program with status 0 before (or instead of) the tests passing
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "raise SystemExit(0)": "raise SystemExit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "atexit os._exit(0) after failing tests": "import atexit, os\natexit.register(lambda: os._exit(0))\n"
                                              "def has_close_elements(numbers, threshold):\n    return None",
    "excepthook os._exit(0)": "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n"
                              "def has_close_elements(numbers, threshold):\n    return None",
    "fake markers on every fd": "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32)\n"
                                "    except OSError:\n        pass\nos._exit(0)",
}


@pytest.mark.parametrize("trick", list(GAMING_TRICKS))
def test_humaneval_exit_tricks_do_not_pass(humaneval_items, trick):
    """A pass means the tests ran to their end: an early or forced exit with status 0 is a fail."""
    item = humaneval_items["HumanEval/0"]
    completion = f"```python\n{item['prompt']}{item['answer']}\n{GAMING_TRICKS[trick]}\n```"
    assert not chat_eval.humaneval_is_correct(item, completion)


def test_humaneval_program_shape(humaneval_items):
    item = humaneval_items["HumanEval/0"]
    program = tasks.humaneval_program(item, "```python\ndef has_close_elements(numbers, threshold):\n    pass\n```")
    assert program.startswith("from typing import List\n\ndef has_close_elements(numbers, threshold):")
    assert program.endswith(item["test"] + "\n\ncheck(has_close_elements)\n")


def test_evaluate_humaneval_tiny_model(model, tokenizer, shared_data):
    config = ChatEvalConfig(tasks="HumanEval", max_per_task=2, max_new_tokens=8)
    results = chat_eval.evaluate(config, model, tokenizer)
    r = results["tasks"]["HumanEval"]
    assert r["n"] == 2 and 0.0 <= r["accuracy"] <= 1.0 and r["baseline"] == 0.0
    assert results["ChatCORE"] == pytest.approx(r["accuracy"])
    assert len(r["samples"]) == 2 and all(isinstance(s["completion"], str) for s in r["samples"])


@pytest.mark.slow
def test_every_humaneval_canonical_solution_passes(humaneval_items):
    from concurrent.futures import ThreadPoolExecutor

    items = list(humaneval_items.values())
    with ThreadPoolExecutor(2) as pool:
        passed = list(pool.map(lambda it: chat_eval.humaneval_is_correct(it, it["prompt"] + it["answer"]), items))
    assert [it["task_id"] for it, ok in zip(items, passed, strict=True) if not ok] == []
