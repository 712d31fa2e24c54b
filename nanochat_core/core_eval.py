"""The CORE metric of the DCLM paper (https://arxiv.org/abs/2406.11794), as nanochat's base_eval computes it.

22 in-context-learning tasks from the eval bundle's core.yaml, each of one of three types:
- multiple_choice: one prompt per choice with a shared context; the choice whose continuation tokens have the
  lowest mean loss wins.
- schema: one prompt per context option with a shared continuation; the context under which that continuation
  has the lowest mean loss wins.
- language_modeling: correct iff greedy argmax reproduces every continuation token.
Prompts are few-shot: `num_fewshot` solved examples, each followed by a blank line, then the item. The prompt
text matches upstream's jinja templates character for character. Every prompt starts with BOS.

Per task: accuracy, centered on the random baseline of eval_meta_data.csv, (acc - b) / (1 - b).
CORE = mean centered accuracy over the 22 tasks.

Reproducibility: each task's items are shuffled with Random(seed + 103) and cropped to max_per_task; the few-shot
examples of item i are drawn with Random(seed + i) from the whole shuffled task minus item i. The default seed
1234 reproduces upstream's pair (shuffle 1337, few-shot 1234 + i) exactly. Unlike upstream (#550), few-shot
examples never come from the cropped subset, so a small max_per_task works and leaves each item's prompt unchanged.

Items are strided across ranks under torchrun and the counts all-reduced; every item is scored in its own
forward pass, so results do not depend on the world size. Run as a stage:
    python -m nanochat_core.core_eval --model DIR --tokenizer DIR --out DIR [--max-per-task N] [--seed S]

The bundle comes from NANOCHAT_DATA's eval_bundle/ when that is set, else from nanochat's eval_bundle.zip
(downloaded once to $NANOCHAT_EVAL_BUNDLE, default ~/.cache/nanochat/eval_bundle.zip).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
import zipfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat_core.chat_eval import all_reduce_counts, rank_and_world
from nanochat_core.checkpoint import CheckpointError, load_model
from nanochat_core.common import cleanup_distributed, init_distributed
from nanochat_core.config import ConfigError
from nanochat_core.data.sources import DATA_ENV, DataError, data_root, read_bytes, resolve
from nanochat_core.fileio import atomic_write_bytes
from nanochat_core.progress import emit_progress, print0
from nanochat_core.tokenizer import Tokenizer, TokenizerError

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_ZIP_ENV = "NANOCHAT_EVAL_BUNDLE"  # where the downloaded zip is kept (or an existing copy is read)
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DEFAULT_DELIMITER = " "
DEFAULT_SEED = 1234  # upstream's few-shot seed
SHUFFLE_SEED_OFFSET = 103  # upstream shuffles with Random(1337) = Random(DEFAULT_SEED + 103)
DEVICE_TYPES = ("", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str  # one of TASK_TYPES
    dataset_uri: str  # path under eval_bundle/eval_data/
    num_fewshot: int
    continuation_delimiter: str
    baseline: float  # random-guess accuracy as a fraction (the csv's "Random baseline" is in percent)


# -----------------------------------------------------------------------------
# the bundle: a mirror directory (NANOCHAT_DATA) or nanochat's zip

def bundle_zip_path() -> Path:
    return Path(os.environ.get(BUNDLE_ZIP_ENV) or Path.home() / ".cache" / "nanochat" / "eval_bundle.zip").expanduser()


def ensure_bundle_zip() -> Path:
    """The local eval_bundle.zip, downloaded on first use (rank 0 downloads, the other ranks wait)."""
    path = bundle_zip_path()
    rank, world = rank_and_world()
    if rank == 0 and not path.is_file():
        print0(f"downloading the CORE eval bundle from {EVAL_BUNDLE_URL} to {path}")
        atomic_write_bytes(path, read_bytes(EVAL_BUNDLE_URL))  # DataError (naming NANOCHAT_DATA) when offline
    if world > 1:
        dist.barrier()
    if not path.is_file():
        raise DataError(f"eval bundle zip not found at {path} (set {DATA_ENV} to a mirror with eval_bundle/)")
    return path


def read_bundle_file(relpath: str) -> tuple[bytes, str]:
    """(contents, location for error messages) of a file inside eval_bundle/."""
    if data_root() is not None:
        location = resolve(f"eval_bundle/{relpath}")
        return read_bytes(location), location
    path = ensure_bundle_zip()
    member = f"eval_bundle/{relpath}"
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(member), f"{path}:{member}"
    except KeyError:
        raise DataError(f"{path} has no {member} (is it nanochat's eval_bundle.zip?)") from None
    except zipfile.BadZipFile as e:
        raise DataError(f"{path} is not a readable zip ({e}); delete it to download it again") from e


def read_baselines() -> dict[str, float]:
    """Task label -> random-guess accuracy in percent, from eval_meta_data.csv."""
    data, location = read_bundle_file("eval_meta_data.csv")
    baselines = {}
    for row in csv.DictReader(io.StringIO(data.decode("utf-8"))):
        try:
            baselines[row["Eval Task"]] = float(row["Random baseline"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{location}: bad row {row!r} (need 'Eval Task' and a numeric 'Random baseline')") from e
    return baselines


def load_core_tasks() -> list[CoreTask]:
    """The tasks of core.yaml, in its order, with their random baselines."""
    import yaml  # pyyaml comes with prefect

    data, location = read_bundle_file("core.yaml")
    try:
        entries = yaml.safe_load(data)["icl_tasks"]
    except (yaml.YAMLError, TypeError, KeyError) as e:
        raise DataError(f"{location} is not a core.yaml with an 'icl_tasks' list: {e}") from e
    baselines = read_baselines()
    tasks = []
    for entry in entries:
        try:
            label, task_type = entry["label"], entry["icl_task_type"]
            task = CoreTask(label=label, task_type=task_type, dataset_uri=entry["dataset_uri"],
                            num_fewshot=int(entry["num_fewshot"][0]),
                            continuation_delimiter=entry.get("continuation_delimiter", DEFAULT_DELIMITER),
                            baseline=0.01 * baselines[label])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(f"{location}: bad task entry {entry!r} (missing or malformed {e})") from e
        if task_type not in TASK_TYPES:
            raise DataError(f"{location}: task {label} has unknown icl_task_type {task_type!r}; known: {TASK_TYPES}")
        tasks.append(task)
    return tasks


# -----------------------------------------------------------------------------
# task data

REQUIRED_FIELDS = {
    "multiple_choice": (("query", str), ("choices", list), ("gold", int)),
    "schema": (("context_options", list), ("continuation", str), ("gold", int)),
    "language_modeling": (("context", str), ("continuation", str)),
}


def check_item(item: Any, task_type: str) -> str | None:
    """What is wrong with one jsonl record, or None."""
    if not isinstance(item, dict):
        return "not a JSON object"
    for name, kind in REQUIRED_FIELDS[task_type]:
        value = item.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"field {name!r} must be a {kind.__name__}, got {value!r}"[:200]
    options = item.get("choices", item.get("context_options"))
    if options is not None:
        if not options or not all(isinstance(o, str) for o in options):
            return "the options must be a non-empty list of strings"
        if not 0 <= item["gold"] < len(options):
            return f"gold {item['gold']} is not an index into its {len(options)} options"
    if task_type == "language_modeling" and not item["continuation"].strip():
        return "empty continuation"
    return None


def load_task_data(task: CoreTask) -> list[dict]:
    """The task's records in file order, each checked for the fields its task type needs."""
    data, location = read_bundle_file(f"eval_data/{task.dataset_uri}")
    items = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{location}:{lineno} is not valid JSON: {e}") from e
        problem = check_item(item, task.task_type)
        if problem:
            raise DataError(f"{location}:{lineno}: {problem} (a {task.task_type} record)")
        items.append(item)
    if len(items) <= task.num_fewshot:
        raise DataError(f"{location}: {len(items)} records, need more than the {task.num_fewshot} few-shot examples")
    return items


def shuffled(items: list[dict], seed: int) -> list[dict]:
    """The evaluation order: many files are sorted (by category, by source), so a subset must be a shuffled one."""
    items = list(items)
    random.Random(seed + SHUFFLE_SEED_OFFSET).shuffle(items)
    return items


def sample_fewshot(data: list[dict], idx: int, num_fewshot: int, seed: int) -> list[dict]:
    """Upstream's draw, Random(seed + idx).sample([i for i in range(n) if i != idx], k), without building the list:
    sample() only indexes its population, so sampling range(n - 1) and skipping idx picks the same items."""
    if num_fewshot == 0:
        return []
    picks = random.Random(seed + idx).sample(range(len(data) - 1), num_fewshot)
    return [data[j + (j >= idx)] for j in picks]


# -----------------------------------------------------------------------------
# prompts (the text of upstream's jinja templates, built directly)

def render_mc(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per choice: the shared context, then the choice."""
    shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per context option, each ending in the shared continuation."""
    shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]


def render_lm(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """[prompt without the continuation, prompt with it]. Contexts are stripped (some carry trailing whitespace),
    and so is the prompt without: a trailing space would merge into the continuation's first token and the
    shorter prompt would no longer be a token prefix of the longer."""
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    context = f"{shots}{item['context'].strip()}{delimiter}"
    return [context.strip(), context + item["continuation"]]


RENDERERS = {"multiple_choice": render_mc, "schema": render_schema, "language_modeling": render_lm}


def render_prompts(task: CoreTask, item: dict, fewshot: list[dict]) -> list[str]:
    """The prompt texts of one item, given its few-shot examples."""
    return RENDERERS[task.task_type](item, task.continuation_delimiter, fewshot)


def item_prompts(task: CoreTask, data: list[dict], idx: int, seed: int = DEFAULT_SEED) -> list[str]:
    """The prompt texts of item `idx` of the shuffled task data (`shuffled(load_task_data(task), seed)`)."""
    return render_prompts(task, data[idx], sample_fewshot(data, idx, task.num_fewshot, seed))


# -----------------------------------------------------------------------------
# tokens and the scored spans

def common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) shared by all sequences."""
    shortest = min(len(s) for s in seqs)
    for i in range(shortest):
        pos = -1 - i if from_end else i
        if any(s[pos] != seqs[0][pos] for s in seqs):
            return i
    return shortest


def continuation_spans(task_type: str, tokenizer, prompts: list[str]) -> tuple[list[list[int]], list[int], list[int]]:
    """Token rows (BOS first) and the [start, end) span of each row whose tokens are scored."""
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    ends = [len(t) for t in tokens]
    if task_type == "multiple_choice":  # shared context: each choice starts where the rows diverge
        # a choice that is a token prefix of the others (a few piqa items) would score nothing, a NaN mean that
        # upstream resolves as "pick choice 0": back the shared start up so every choice scores a token
        start = min(common_length(tokens), min(ends) - 1)
        starts = [start] * len(tokens)
    elif task_type == "schema":  # shared continuation: the common suffix
        suffix = common_length(tokens, from_end=True)
        starts = [end - max(1, suffix) for end in ends]
    else:  # only the prompt with the continuation runs; the one without marks where it starts
        without, with_ = tokens
        # normally `without` is a prefix of `with_`; if a tokenizer merges across the boundary, score from the split
        start = min(len(without), common_length(tokens), len(with_) - 1)
        tokens, starts, ends = [with_], [start], [len(with_)]
    return tokens, starts, ends


def crop_to_context(tokens: list[list[int]], starts: list[int], ends: list[int],
                    max_len: int) -> tuple[list[list[int]], list[int], list[int], bool]:
    """Left-crop rows longer than the model's context, keeping the continuation; also says whether any was cropped.
    A continuation longer than the context keeps its last max_len - 1 tokens (the first position has no loss)."""
    new_tokens, new_starts, new_ends, cropped = [], [], [], False
    for row, start, end in zip(tokens, starts, ends, strict=True):
        drop = max(0, len(row) - max_len)
        cropped |= drop > 0
        new_tokens.append(row[drop:])
        new_starts.append(max(1, start - drop))
        new_ends.append(end - drop)
    return new_tokens, new_starts, new_ends, cropped


# -----------------------------------------------------------------------------
# scoring

@torch.no_grad()
def score_rows(model, task_type: str, tokens: list[list[int]], starts: list[int], ends: list[int], gold: int | None,
               pad_id: int) -> bool:
    """One forward over the item's rows (right-padded: causal attention keeps padding out of the spans)."""
    device = next(model.parameters()).device
    width = max(len(t) for t in tokens)
    batch = torch.tensor([t + [pad_id] * (width - len(t)) for t in tokens], dtype=torch.long, device=device)
    logits = model(batch).float()
    if task_type == "language_modeling":  # position p predicts token p + 1
        s, e = starts[0], ends[0]
        return bool(torch.equal(logits[0, s - 1:e - 1].argmax(dim=-1), batch[0, s:e]))
    mean_losses = [F.cross_entropy(logits[i, s - 1:e - 1], batch[i, s:e]).item()
                   for i, (s, e) in enumerate(zip(starts, ends, strict=True))]
    return mean_losses.index(min(mean_losses)) == gold  # ties go to the first option, as upstream


def evaluate_item(model, tokenizer, task: CoreTask, data: list[dict], idx: int, seed: int) -> tuple[bool, bool]:
    """(correct, cropped) for item `idx` of the shuffled task data."""
    prompts = item_prompts(task, data, idx, seed)
    tokens, starts, ends = continuation_spans(task.task_type, tokenizer, prompts)
    tokens, starts, ends, cropped = crop_to_context(tokens, starts, ends, int(model.config.sequence_len))
    correct = score_rows(model, task.task_type, tokens, starts, ends, data[idx].get("gold"),
                         tokenizer.get_bos_token_id())
    return correct, cropped


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """Accuracy rescaled so random guessing is 0 and perfect is 1 (baseline as a fraction)."""
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_task(model, tokenizer, task: CoreTask, max_per_task: int, seed: int) -> dict[str, Any]:
    rank, world = rank_and_world()
    data = shuffled(load_task_data(task), seed)
    num_items = len(data) if max_per_task == -1 else min(max_per_task, len(data))
    correct = cropped = mine = 0
    for idx in range(rank, num_items, world):
        is_correct, was_cropped = evaluate_item(model, tokenizer, task, data, idx, seed)
        correct, cropped, mine = correct + is_correct, cropped + was_cropped, mine + 1
    device = next(model.parameters()).device
    correct, total, cropped = all_reduce_counts([correct, mine, cropped], device)
    accuracy = correct / total if total else 0.0
    return {"accuracy": accuracy, "centered": centered_accuracy(accuracy, task.baseline), "baseline": task.baseline,
            "n": total, "correct": correct, "cropped": cropped, "type": task.task_type,
            "num_fewshot": task.num_fewshot}


def check_max_per_task(max_per_task: Any) -> None:
    if isinstance(max_per_task, bool) or not isinstance(max_per_task, int) or (max_per_task < 1 and max_per_task != -1):
        raise ConfigError(f"max_per_task must be -1 (all items) or a positive integer, got {max_per_task!r}")


def evaluate_core(model, tokenizer, max_per_task: int = -1, seed: int = DEFAULT_SEED,
                  progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Evaluate every CORE task. Returns {"tasks": {label: {accuracy, centered, baseline, n, correct, cropped, type,
    num_fewshot}}, "CORE": mean centered accuracy}. `progress(step, total, **metrics)` is called after each task
    (default: emit_progress). Pass the uncompiled model: every item has its own sequence length."""
    check_max_per_task(max_per_task)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                          f"{model.config.vocab_size}: use the tokenizer the model was trained with")
    report = progress or emit_progress
    tasks = load_core_tasks()
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    try:
        with autocast:
            for i, task in enumerate(tasks):
                r = evaluate_task(model, tokenizer, task, max_per_task, seed)
                results[task.label] = r
                note = f", {r['cropped']} cropped" if r["cropped"] else ""
                print0(f"{task.label:<34} acc {r['accuracy']:.4f}  centered {r['centered']:+.4f}  "
                       f"({r['correct']}/{r['n']}{note})")
                report(i + 1, len(tasks), task=task.label, accuracy=r["accuracy"], centered=r["centered"])
    finally:
        model.train(was_training)
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"tasks": results, "CORE": core}


# -----------------------------------------------------------------------------
# the stage CLI

def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """metrics.json: {"CORE": x, label: accuracy, ...}."""
    return {"CORE": results["CORE"], **{label: r["accuracy"] for label, r in results["tasks"].items()}}


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    check_max_per_task(args.max_per_task)
    for flag in ("model", "tokenizer"):
        if not Path(getattr(args, flag)).is_dir():
            raise ConfigError(f"--{flag} {getattr(args, flag)} is not a directory")
    info = init_distributed(args.device_type)
    try:
        model, meta = load_model(args.model, info.device, phase="eval")
        tokenizer = Tokenizer.load(args.tokenizer)
        out = Path(args.out)
        if info.is_master:
            try:  # fail now, not after the evaluation
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--out {out} cannot be created: {e}") from e
        results = evaluate_core(model, tokenizer, max_per_task=args.max_per_task, seed=args.seed)
        if info.is_master:
            write_json(out / "results.json", {**results, "max_per_task": args.max_per_task, "seed": args.seed,
                                              "model": str(args.model), "step": meta.get("step")})
            write_json(out / "metrics.json", flat_metrics(results))
            print0(f"CORE: {results['CORE']:.4f}")
        return results
    finally:
        cleanup_distributed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a base model on the 22 DCLM CORE tasks.")
    parser.add_argument("--model", required=True, help="model directory (load_model)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("--out", required=True, help="output directory for results.json and metrics.json")
    parser.add_argument("--max-per-task", type=int, default=-1, help="-1 = every item; else a seeded subset")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="subset and few-shot seed (upstream: 1234)")
    parser.add_argument("--device-type", default="", choices=DEVICE_TYPES, help="'' = autodetect")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ConfigError, DataError, CheckpointError, TokenizerError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
