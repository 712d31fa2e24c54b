"""CORE on the real eval bundle (../shared/data/eval_bundle) with a tiny GPT and a tiny trained tokenizer: the task
list, exact prompt texts and scored token spans of each task type checked by hand, upstream's few-shot draw,
small subsets, cropping, the centered formula, the full 22-task run, the stage CLI (1 and 2 ranks) and bad input."""

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict, replace

import pytest
import torch

from nanochat_core import core_eval
from nanochat_core.checkpoint import save_final_model
from nanochat_core.config import ConfigError
from nanochat_core.data.sources import DataError
from nanochat_core.gpt import GPT, config_for_depth

SEQ_LEN = 256  # short, so the 10-shot reading-comprehension prompts get cropped


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(config_for_depth(1, tokenizer.get_vocab_size(), SEQ_LEN))
    gpt.init_weights()
    torch.nn.init.normal_(gpt.lm_head.weight, std=0.5)  # the init's zero head would make every choice a tie
    return gpt.eval()


@pytest.fixture(scope="module")
def tasks(shared_data) -> dict[str, core_eval.CoreTask]:
    return {t.label: t for t in core_eval.load_core_tasks()}


@pytest.fixture(scope="module")
def task_data(tasks):
    cache = {}

    def get(label: str) -> list[dict]:
        if label not in cache:
            cache[label] = core_eval.load_task_data(tasks[label])
        return cache[label]

    return get


def span_texts(tokenizer, task_type: str, prompts: list[str]) -> list[str]:
    tokens, starts, ends = core_eval.continuation_spans(task_type, tokenizer, prompts)
    assert all(t[0] == tokenizer.get_bos_token_id() for t in tokens)
    return [tokenizer.decode(t[s:e]) for t, s, e in zip(tokens, starts, ends, strict=True)]


# -----------------------------------------------------------------------------
# the task list

def test_core_tasks_match_core_yaml(tasks):
    assert len(tasks) == 22
    assert list(tasks)[:3] == ["hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata"]
    types = {t.task_type for t in tasks.values()}
    assert types == {"multiple_choice", "schema", "language_modeling"}
    assert [label for label, t in tasks.items() if t.task_type == "schema"] == ["winograd", "winogrande"]
    assert tasks["arc_easy"].continuation_delimiter == "\nAnswer: " and tasks["jeopardy"].continuation_delimiter == (
        "\nAnswer: ")
    assert tasks["copa"].continuation_delimiter == " " and tasks["lambada_openai"].continuation_delimiter == " "
    assert {label: tasks[label].num_fewshot for label in ("hellaswag_zeroshot", "hellaswag", "agi_eval_lsat_ar",
                                                          "copa", "squad")} == {
        "hellaswag_zeroshot": 0, "hellaswag": 10, "agi_eval_lsat_ar": 3, "copa": 0, "squad": 10}
    assert tasks["arc_easy"].baseline == 0.25 and tasks["boolq"].baseline == 0.62
    assert tasks["bigbench_language_identification"].baseline == pytest.approx(0.091)
    assert tasks["lambada_openai"].baseline == 0.0


# -----------------------------------------------------------------------------
# prompts and scored spans, one task of each type

def test_multiple_choice_zero_shot_copa(tasks, task_data, tokenizer):
    item = task_data("copa")[0]
    prompts = core_eval.render_prompts(tasks["copa"], item, [])
    assert prompts == ["The man turned on the faucet, therefore the toilet filled with water.",
                       "The man turned on the faucet, therefore water flowed from the spout."]
    assert span_texts(tokenizer, "multiple_choice", prompts) == [" the toilet filled with water.",
                                                                 " water flowed from the spout."]


def test_multiple_choice_choice_that_prefixes_another(tasks, tokenizer):
    """A few piqa items have a choice that extends another: every choice still scores a token. (The split pattern
    ends a chunk at ',', so the shorter choice is a token prefix under any tokenizer of this pattern.)"""
    item = {"query": "Question: compactor\n", "choices": ["can squish water", "can squish water, and melons"],
            "gold": 1}
    prompts = core_eval.render_prompts(tasks["piqa"], item, [])
    assert prompts == ["Question: compactor\n\nAnswer: can squish water",
                       "Question: compactor\n\nAnswer: can squish water, and melons"]
    tokens, starts, ends = core_eval.continuation_spans("multiple_choice", tokenizer, prompts)
    assert starts[0] == starts[1] == ends[0] - 1 < ends[1]
    assert tokens[0][:ends[0]] == tokens[1][:ends[0]]


def test_multiple_choice_few_shot_arc_easy(tasks, task_data, tokenizer):
    data = task_data("arc_easy")
    prompts = core_eval.render_prompts(tasks["arc_easy"], data[0], [data[1], data[2]])
    shots = ("Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory "
             "system?\nAnswer: breathing mask\n\n"
             "Question: Meiosis is a type of cell division in which germ cells divide to produce haploid cells. "
             "Where does meiosis occur?\nAnswer: ovary cells\n\n")
    question = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert prompts == [f"{shots}{question}\nAnswer: Sunlight is the source of energy for nearly all ecosystems.",
                       f"{shots}{question}\nAnswer: Most ecosystems are found on land instead of in water.",
                       f"{shots}{question}\nAnswer: Carbon dioxide is more available than other gases.",
                       f"{shots}{question}\nAnswer: The producers in all ecosystems are plants."]
    assert span_texts(tokenizer, "multiple_choice", prompts) == [
        " Sunlight is the source of energy for nearly all ecosystems.",
        " Most ecosystems are found on land instead of in water.",
        " Carbon dioxide is more available than other gases.",
        " The producers in all ecosystems are plants."]


def test_multiple_choice_few_shot_literal_text(tasks, tokenizer):
    """The whole few-shot layout, literally: shot, delimiter, gold choice, blank line, ..., item, delimiter, choice."""
    shot = {"query": "Question: Q1?", "choices": ["no", "yes"], "gold": 1}
    item = {"query": "Question: Q2?", "choices": ["red", "blue"], "gold": 0}
    assert core_eval.render_prompts(tasks["piqa"], item, [shot, shot]) == [
        "Question: Q1?\nAnswer: yes\n\nQuestion: Q1?\nAnswer: yes\n\nQuestion: Q2?\nAnswer: red",
        "Question: Q1?\nAnswer: yes\n\nQuestion: Q1?\nAnswer: yes\n\nQuestion: Q2?\nAnswer: blue"]


def test_schema_winograd(tasks, task_data, tokenizer):
    item = task_data("winograd")[0]
    prompts = core_eval.render_prompts(tasks["winograd"], item, [])
    assert prompts == ["The city councilmen refused the demonstrators a permit because the city councilmen "
                       "feared violence.",
                       "The city councilmen refused the demonstrators a permit because the demonstrators "
                       "feared violence."]
    assert span_texts(tokenizer, "schema", prompts) == [" feared violence.", " feared violence."]
    # few-shot schema examples use their gold context option
    shot = task_data("winogrande")[0]
    two_shot = core_eval.render_prompts(tasks["winograd"], item, [shot])
    assert two_shot[1] == ("Sarah was a much better surgeon than Maria so Maria always got the easier cases.\n\n"
                           + prompts[1])


def test_language_modeling_lambada(tasks, task_data, tokenizer):
    item = task_data("lambada_openai")[0]
    without, with_ = core_eval.render_prompts(tasks["lambada_openai"], item, [])
    assert without == item["context"] and without.endswith("But as I stare at Harlin, his mouth curved in a "
                                                           "confident grin, I don't care about")
    assert with_ == without + " signs"
    assert span_texts(tokenizer, "language_modeling", [without, with_]) == [" signs"]


def test_language_modeling_few_shot_jeopardy(tasks, task_data, tokenizer):
    data = task_data("jeopardy")
    without, with_ = core_eval.render_prompts(tasks["jeopardy"], data[0], [data[1]])
    shot = ("WORLD HISTORY: Accused of accepting bribes, Francis Bacon was imprisoned in this forbidding complex "
            "in 1621\nAnswer: Tower of London\n\n")
    assert without == shot + ("WORLD HISTORY: This Navy commander flew from a base at Little America to the South "
                              "Pole & back Nov. 28-29, 1929\nAnswer:")  # the delimiter's trailing space is stripped
    assert with_ == without + " Admiral Richard Byrd"
    assert span_texts(tokenizer, "language_modeling", [without, with_]) == [" Admiral Richard Byrd"]


def test_language_modeling_strips_context_whitespace(tasks, tokenizer):
    item = {"context": "  2 + 2 =  \n", "continuation": "4"}
    shot = {"context": "1 + 1 = ", "continuation": "2"}
    assert core_eval.render_prompts(tasks["bigbench_operators"], item, [shot]) == ["1 + 1 = 2\n\n2 + 2 =",
                                                                                   "1 + 1 = 2\n\n2 + 2 = 4"]


# -----------------------------------------------------------------------------
# scoring, checked against the model's own outputs

def test_language_modeling_scores_the_greedy_continuation(model, tokenizer):
    bos = tokenizer.get_bos_token_id()
    row = [bos, *tokenizer.encode("The native language of Daniel Schneidermann is")]
    with torch.no_grad():
        for _ in range(3):  # extend the row with the model's own greedy tokens
            row.append(int(model(torch.tensor([row]))[0, -1].argmax()))
    start, end = len(row) - 3, len(row)
    assert core_eval.score_rows(model, "language_modeling", [row], [start], [end], None, bos)
    for pos in range(start, end):  # any wrong token in the span makes it incorrect
        wrong = list(row)
        wrong[pos] = (wrong[pos] + 1) % tokenizer.get_vocab_size()
        assert not core_eval.score_rows(model, "language_modeling", [wrong], [start], [end], None, bos)


@pytest.mark.parametrize("task_type", ["multiple_choice", "schema"])
def test_options_are_ranked_by_mean_continuation_loss(model, tokenizer, task_type):
    """The winner is the row whose span has the lowest mean loss, each row computed alone (so padding is inert)."""
    if task_type == "multiple_choice":
        prompts = ["The man turned on the faucet, therefore water flowed.",
                   "The man turned on the faucet, therefore the toilet filled with water and overflowed.",
                   "The man turned on the faucet, therefore"]
    else:
        prompts = ["The trophy would not fit in the suitcase because the suitcase was too big.",
                   "The trophy would not fit because the trophy was too big."]
    tokens, starts, ends = core_eval.continuation_spans(task_type, tokenizer, prompts)
    means = []
    with torch.no_grad():
        for t, s, e in zip(tokens, starts, ends, strict=True):
            logp = torch.log_softmax(model(torch.tensor([t]))[0].float(), dim=-1)
            means.append(-logp[s - 1:e - 1].gather(1, torch.tensor(t[s:e])[:, None]).mean().item())
    best = means.index(min(means))
    bos = tokenizer.get_bos_token_id()
    for gold in range(len(prompts)):
        assert core_eval.score_rows(model, task_type, tokens, starts, ends, gold, bos) == (gold == best)


# -----------------------------------------------------------------------------
# sampling, subsets, cropping

def test_fewshot_draw_is_upstreams_and_deterministic(tasks, task_data):
    task = tasks["bigbench_qa_wikidata"]
    data = core_eval.shuffled(task_data("bigbench_qa_wikidata"), core_eval.DEFAULT_SEED)
    reference = list(task_data("bigbench_qa_wikidata"))
    random.Random(1337).shuffle(reference)  # upstream's shuffle
    assert data == reference
    for idx in (0, 1, 7, len(data) - 1):
        rng = random.Random(1234 + idx)  # upstream's draw, with the item itself left out
        expected = [data[i] for i in rng.sample([i for i in range(len(data)) if i != idx], 10)]
        drawn = core_eval.sample_fewshot(data, idx, 10, core_eval.DEFAULT_SEED)
        assert drawn == expected and data[idx] not in drawn
        assert core_eval.item_prompts(task, data, idx) == core_eval.item_prompts(task, data, idx)
    assert core_eval.sample_fewshot(data, 0, 10, 1) != core_eval.sample_fewshot(data, 0, 10, 2)
    assert core_eval.shuffled(data, 1) != core_eval.shuffled(data, 2)


def test_subset_smaller_than_fewshot_count(model, tokenizer, tasks):
    """Upstream crashed here (#550): the few-shot pool is the whole task, not the 2-item subset."""
    r = core_eval.evaluate_task(model, tokenizer, tasks["hellaswag"], max_per_task=2, seed=core_eval.DEFAULT_SEED)
    assert r["n"] == 2 and r["num_fewshot"] == 10 and r["correct"] in (0, 1, 2)
    with pytest.raises(ConfigError, match="max_per_task"):
        core_eval.evaluate_core(model, tokenizer, max_per_task=0)


def test_crop_keeps_the_continuation():
    tokens, starts, ends, cropped = core_eval.crop_to_context([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3]], [5, 2],
                                                              [8, 4], max_len=6)
    assert cropped and tokens == [[2, 3, 4, 5, 6, 7], [0, 1, 2, 3]] and starts == [3, 2] and ends == [6, 4]
    # a continuation longer than the context keeps what fits after the first position
    tokens, starts, ends, _ = core_eval.crop_to_context([list(range(10))], [2], [10], max_len=4)
    assert tokens == [[6, 7, 8, 9]] and starts == [1] and ends == [4]
    assert core_eval.crop_to_context([[0, 1]], [1], [2], max_len=4)[3] is False


def test_long_prompts_are_cropped_to_the_model_context(model, tokenizer, tasks):
    r = core_eval.evaluate_task(model, tokenizer, tasks["squad"], max_per_task=2, seed=core_eval.DEFAULT_SEED)
    assert r["n"] == 2 and r["cropped"] == 2  # 10 passages do not fit in 256 tokens


# -----------------------------------------------------------------------------
# the whole metric

def csv_baselines(shared_data) -> dict[str, float]:
    with open(shared_data / "eval_bundle" / "eval_meta_data.csv", newline="") as f:
        return {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}


def test_centered_formula():
    assert core_eval.centered_accuracy(0.25, 0.25) == 0.0
    assert core_eval.centered_accuracy(1.0, 0.62) == pytest.approx(1.0)
    assert core_eval.centered_accuracy(0.5, 0.25) == pytest.approx(1 / 3)
    assert core_eval.centered_accuracy(0.0, 0.5) == pytest.approx(-1.0)


def test_evaluate_core_on_all_tasks(model, tokenizer, shared_data):
    calls = []
    results = core_eval.evaluate_core(model, tokenizer, max_per_task=2,
                                      progress=lambda step, total, **m: calls.append((step, total, m["task"])))
    per_task = results["tasks"]
    assert len(per_task) == 22 and [c[:2] for c in calls] == [(i, 22) for i in range(1, 23)]
    baselines = csv_baselines(shared_data)
    for label, r in per_task.items():
        assert set(r) == {"accuracy", "centered", "baseline", "n", "correct", "cropped", "type", "num_fewshot"}
        assert r["n"] == 2 and r["accuracy"] == r["correct"] / 2 and 0 <= r["cropped"] <= 2
        b = 0.01 * baselines[label]
        assert r["baseline"] == pytest.approx(b)
        assert r["centered"] == pytest.approx((r["accuracy"] - 0.01 * baselines[label]) / (1 - 0.01 * baselines[label]))
    assert results["CORE"] == pytest.approx(sum(r["centered"] for r in per_task.values()) / 22)
    assert -2.0 < results["CORE"] <= 1.0
    assert sum(r["cropped"] for r in per_task.values()) > 0
    assert not model.training
    print(f"\ntiny-model CORE (max_per_task=2): {results['CORE']:.4f}; "
          + ", ".join(f"{k} {v['accuracy']:.1f}" for k, v in per_task.items()))


# -----------------------------------------------------------------------------
# the stage CLI

def cli_args(model_dir, tokenizer_dir, out, *extra) -> list[str]:
    return ["--model", str(model_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--device-type", "cpu",
            *extra]


def test_cli_one_rank_equals_two_ranks(model, tiny_tokenizer_dir, tmp_path, shared_data):
    """Items strided over 2 gloo ranks with all-reduced counts give the 1-process numbers (run side by side)."""
    model_dir = tmp_path / "model"
    save_final_model(model_dir, model, {"model_config": asdict(model.config), "step": 7})
    extra = ("--max-per-task", "3", "--seed", "5")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nanochat_core.core_eval", *cli_args(model_dir, tiny_tokenizer_dir, tmp_path / "out2", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        core_eval.main(cli_args(model_dir, tiny_tokenizer_dir, tmp_path / "out1", *extra))
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"torchrun with 2 ranks failed:\n{out[-4000:]}"
    one = json.loads((tmp_path / "out1" / "results.json").read_text())
    two = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert one["tasks"] == two["tasks"] and one["CORE"] == two["CORE"]
    assert one["step"] == 7 and one["max_per_task"] == 3 and one["seed"] == 5
    assert all(r["n"] == 3 for r in one["tasks"].values())
    metrics = json.loads((tmp_path / "out1" / "metrics.json").read_text())
    assert metrics == {"CORE": one["CORE"], **{k: r["accuracy"] for k, r in one["tasks"].items()}}
    assert "NANOCHAT_PROGRESS" in out and '"task": "bigbench_language_identification"' in out


# -----------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("value", ["0", "-2"])
def test_cli_rejects_bad_max_per_task(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        core_eval.main(cli_args(tmp_path, tmp_path, tmp_path / "out", "--max-per-task", value))
    assert e.value.code == 2
    assert f"error: max_per_task must be -1 (all items) or a positive integer, got {value}" in capsys.readouterr().err


def test_cli_rejects_missing_model_and_broken_model(tiny_tokenizer_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        core_eval.main(cli_args(tmp_path / "nope", tiny_tokenizer_dir, tmp_path / "out"))
    assert e.value.code == 2 and f"--model {tmp_path / 'nope'} is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        core_eval.main(cli_args(tmp_path, tiny_tokenizer_dir, tmp_path / "out"))  # a directory without a model
    assert e.value.code == 2 and "meta.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_unwritable_out_before_evaluating(model, tiny_tokenizer_dir, tmp_path, capsys):
    save_final_model(tmp_path / "model", model, {"model_config": asdict(model.config)})
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        core_eval.main(cli_args(tmp_path / "model", tiny_tokenizer_dir, tmp_path / "file" / "out"))
    err = capsys.readouterr()
    assert e.value.code == 2 and f"--out {tmp_path / 'file' / 'out'} cannot be created" in err.err
    assert "NANOCHAT_PROGRESS" not in err.out


def make_mirror(shared_data, root, broken: str | None = None):
    """A mirror with the real core.yaml and csv whose task files link to the real ones; `broken` gets a bad line."""
    bundle = root / "eval_bundle"
    shutil.copytree(shared_data / "eval_bundle", bundle, ignore=shutil.ignore_patterns("*.jsonl", "reference"))
    for path in (shared_data / "eval_bundle" / "eval_data").rglob("*.jsonl"):
        target = bundle / path.relative_to(shared_data / "eval_bundle")
        if path.name == broken:
            lines = path.read_text().splitlines()
            target.write_text("\n".join(lines[:2] + ['{"query": "half a record"'] + lines[2:]) + "\n")
        else:
            target.symlink_to(path)
    return bundle


def test_malformed_records_are_named(shared_data, tmp_path, monkeypatch, tasks):
    bundle = make_mirror(shared_data, tmp_path, broken="copa.jsonl")
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"copa\.jsonl:3 is not valid JSON"):
        core_eval.load_task_data(tasks["copa"])
    (bundle / "eval_data" / "commonsense_reasoning" / "copa.jsonl").write_text(
        '{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(DataError, match=r"copa\.jsonl:1: gold 2 is not an index into its 2 options"):
        core_eval.load_task_data(tasks["copa"])
    (bundle / "eval_data" / "commonsense_reasoning" / "copa.jsonl").write_text('{"query": "q", "gold": 0}\n')
    with pytest.raises(DataError, match=r"copa\.jsonl:1: field 'choices' must be a list"):
        core_eval.load_task_data(tasks["copa"])


def test_missing_bundle_file_is_named(shared_data, tmp_path, monkeypatch, model, tokenizer, tasks):
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"data file not found: .*eval_bundle/core\.yaml"):
        core_eval.evaluate_core(model, tokenizer, max_per_task=1)
    bundle = make_mirror(shared_data, tmp_path)
    (bundle / "eval_data" / "world_knowledge" / "arc_easy.jsonl").unlink()
    with pytest.raises(DataError, match=r"data file not found: .*world_knowledge/arc_easy\.jsonl"):
        core_eval.load_task_data(tasks["arc_easy"])
    # a task in core.yaml without a random baseline in the csv
    yaml_text = (bundle / "core.yaml").read_text().replace("label: copa", "label: copa_v2")
    (bundle / "core.yaml").write_text(yaml_text)
    with pytest.raises(DataError, match="copa_v2"):
        core_eval.load_core_tasks()


def test_bundle_zip_layout(shared_data, tmp_path, monkeypatch, tasks, task_data):
    """Without NANOCHAT_DATA the bundle is read from nanochat's eval_bundle.zip (here built from the mirror)."""
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("core.yaml", "eval_meta_data.csv", "eval_data/commonsense_reasoning/copa.jsonl"):
            z.write(shared_data / "eval_bundle" / name, f"eval_bundle/{name}")
    monkeypatch.delenv("NANOCHAT_DATA")
    monkeypatch.setenv(core_eval.BUNDLE_ZIP_ENV, str(archive))
    assert {t.label: t for t in core_eval.load_core_tasks()} == tasks
    assert core_eval.load_task_data(tasks["copa"]) == task_data("copa")
    with pytest.raises(DataError, match=r"has no eval_bundle/eval_data/world_knowledge/arc_easy\.jsonl"):
        core_eval.load_task_data(tasks["arc_easy"])
    archive.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        core_eval.load_core_tasks()


def test_vocab_mismatch_is_a_config_error(tokenizer):
    small = GPT(replace(config_for_depth(1, 300, SEQ_LEN)))
    with pytest.raises(ConfigError, match="tokenizer has 512 tokens but the model only 300"):
        core_eval.evaluate_core(small, tokenizer, max_per_task=1)
