"""RL on GSM8K end to end on a tiny model: 1 and 2 ranks under torchrun, exact resume after SIGTERM, bad input,
and the pieces (rollout targets, the policy-gradient loss, seeds) checked by hand.

The "SFT model" is a tiny GPT trained here for a second to answer the first RL training questions with a bare
'#### N', half-memorised: at temperature 1 some samples are right and some wrong, so advantages are non-zero
and RL really changes the weights (a random model earns reward 0 everywhere: zero advantage, zero gradient)."""

import json
import math
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_train import interrupt_after_first_checkpoint, run_ok, same_weights

from nanochat_core.checkpoint import latest_checkpoint, load_model, save_final_model
from nanochat_core.config import ConfigError
from nanochat_core.engine import Engine
from nanochat_core.gpt import GPT, config_for_depth
from nanochat_core.stage_cli import PREEMPTED_EXIT_CODE
from nanochat_core.tokenizer import Tokenizer
from nanochat_core.train import rl

TINY_RL = {"num_iterations": 4, "max_examples": 4, "examples_per_step": 2, "num_samples": 4, "device_batch_size": 2,
           "max_new_tokens": 8, "eval_every": 2, "max_eval": 4, "eval_samples": 2, "save_every": 1,
           "device_type": "cpu"}
SEQ_LEN = 512
MEMORISE_STEPS = 30  # enough to answer right some of the time, not always


def rl_command(sft, tokenizer, out, nproc: int | None = 1, **overrides) -> list[str]:
    args = ["--model", str(sft), "--tokenizer", str(tokenizer), "--out", str(out)]
    for k, v in {**TINY_RL, **overrides}.items():
        args += [f"--{k.replace('_', '-')}", v if isinstance(v, str) else json.dumps(v)]
    if nproc is None:  # plain python, world size 1
        return [sys.executable, "-m", "nanochat_core.train.rl", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "nanochat_core.train.rl", *args]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / "model.pt", weights_only=True)


def deterministic(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("train_seconds", "resumed_from_step")}


@pytest.fixture(scope="module")
def sft_dir(tokenizer, shared_data, tmp_path_factory) -> Path:
    """A tiny chat model that half-knows the answers to the first RL training questions."""
    questions = rl.train_questions(rl.RLConfig(max_examples=TINY_RL["max_examples"]))
    rows = [tokenizer.render_conversation({"messages": [q["messages"][0],
                                                        {"role": "assistant", "content": f"#### {q['answer']}"}]})
            for q in questions]
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.zeros((len(rows), width), dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, : len(ids) - 1] = torch.where(torch.tensor(mask[1:]) == 1, torch.tensor(ids[1:]), -1)
    torch.manual_seed(0)
    model = GPT(config_for_depth(2, tokenizer.get_vocab_size(), SEQ_LEN))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(MEMORISE_STEPS):
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = tmp_path_factory.mktemp("sft")
    save_final_model(out, model, {"stage": "sft", "model_config": asdict(model.config), "step": MEMORISE_STEPS})
    return out


@pytest.fixture(scope="module")
def rl_ref(sft_dir, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """An uninterrupted run under torchrun (1 process): the reference for the resume test."""
    out = tmp_path_factory.mktemp("rl_ref")
    run_ok(rl_command(sft_dir, tiny_tokenizer_dir, out))
    return out


# ---------------------------------------------------------------------------------------------
# the pieces

def test_policy_targets_cover_sampled_tokens_only():
    """Prompt (mask 0), forced calculator output (mask 0) and padding are never targets."""
    sequences = [[1, 2, 3, 10, 11, 12, 13], [1, 2, 3, 20]]
    masks = [[0, 0, 0, 1, 0, 0, 1], [0, 0, 0, 1]]
    inputs, targets = rl.policy_batch(sequences, masks, pad_id=99, device=torch.device("cpu"))
    assert inputs.tolist() == [[1, 2, 3, 10, 11, 12], [1, 2, 3, 20, 99, 99]]
    assert targets.tolist() == [[-1, -1, 10, -1, -1, 13], [-1, -1, 20, -1, -1, -1]]


def test_policy_gradient_loss_by_hand(tokenizer):
    torch.manual_seed(0)
    model = GPT(config_for_depth(1, tokenizer.get_vocab_size(), 32))
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # non-uniform logits
    inputs = torch.randint(0, 100, (2, 6))
    targets = torch.randint(0, 100, (2, 6))
    targets[0, :3] = -1
    advantages = torch.tensor([0.5, -0.5])
    logp = torch.log_softmax(model(inputs), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = -((logp * advantages[:, None]) * (targets >= 0)).sum() / (targets >= 0).sum()
    assert rl.policy_gradient_loss(model, inputs, targets, advantages).item() == pytest.approx(expected.item(),
                                                                                              rel=1e-5)
    assert rl.policy_gradient_loss(model, inputs, targets, torch.zeros(2)).item() == 0.0  # same reward: no signal
    assert rl.policy_gradient_loss(model, inputs, torch.full_like(targets, -1), advantages).item() == 0.0


def test_seeds_questions_and_passes():
    assert rl.sample_seed(42, 3, 17, 0) == rl.sample_seed(42, 3, 17, 0) != rl.sample_seed(42, 3, 17, 1)
    assert 0 <= rl.sample_seed("eval", 1) < 2**31
    assert rl.chunk_sizes(16, 8) == [8, 8] and rl.chunk_sizes(5, 2) == [2, 2, 1]
    config = rl.RLConfig(max_examples=5)
    first = rl.train_questions(config)
    assert len(first) == 5 and first == rl.train_questions(config)
    assert first != rl.train_questions(rl.RLConfig(max_examples=5, seed=1))
    assert len(rl.eval_questions(rl.RLConfig(max_eval=3))) == 3
    assert len(rl.eval_questions(rl.RLConfig(max_eval=-1))) == 1319


def test_rollouts_are_seeded_and_rewarded(sft_dir, tokenizer):
    model, _ = load_model(sft_dir, "cpu")
    engine, config = Engine(model, tokenizer), rl.RLConfig(**{**TINY_RL, "device_batch_size": 3})
    question = rl.train_questions(config)[0]
    a = rl.sample_answers(engine, tokenizer, question, 4, config, (42, 0, 0), SEQ_LEN)
    assert a == rl.sample_answers(engine, tokenizer, question, 4, config, (42, 0, 0), SEQ_LEN)
    assert len(a.sequences) == len(a.masks) == len(a.rewards) == 4  # passes of 3 + 1
    prompt = tokenizer.render_for_completion(question)
    for seq, mask, reward in zip(a.sequences, a.masks, a.rewards, strict=True):
        assert seq[: len(prompt)] == prompt and mask[: len(prompt)] == [0] * len(prompt)
        assert reward == float(f"#### {question['answer']}" in tokenizer.decode(seq[len(prompt):]))


def test_config_validation():
    for bad, field in [({"num_samples": 1}, "num_samples"), ({"max_eval": 0}, "max_eval"),
                       ({"temperature": 0.0}, "temperature"), ({"init_lr_frac": 0.0}, "init_lr_frac"),
                       ({"device_type": "tpu"}, "device_type"), ({"examples_per_step": 0}, "examples_per_step")]:
        with pytest.raises(ConfigError, match=f"RLConfig.{field}"):
            rl.RLConfig(**bad).validate()
    with pytest.raises(ConfigError, match="examples_per_step=3"):
        rl.RLConfig(examples_per_step=3).examples_per_rank(2)


# ---------------------------------------------------------------------------------------------
# the stage

def test_one_rank_under_torchrun_trains_and_writes_its_files(rl_ref, sft_dir):
    metrics = json.loads((rl_ref / "metrics.json").read_text())
    assert set(metrics) == {"GSM8K", "pass@1", "pass@2", "reward", "loss", "steps", "examples", "train_seconds",
                            "resumed_from_step"}
    assert metrics["steps"] == 4 and metrics["examples"] == 8 and metrics["resumed_from_step"] == 0
    assert metrics["GSM8K"] == metrics["pass@1"] <= metrics["pass@2"] <= 1.0
    assert 0.0 <= metrics["reward"] <= 1.0 and math.isfinite(metrics["loss"])
    assert not same_weights(rl_ref, sft_dir)  # some question had mixed rewards: a real gradient
    assert all(torch.isfinite(w).all() for w in weights(rl_ref).values())
    _, meta = load_model(rl_ref, "cpu")
    assert meta["stage"] == "rl" and meta["step"] == 4
    assert sorted(p.name for p in (rl_ref / "checkpoints").iterdir()) == ["step_000003", "step_000004"]


def test_sigterm_then_rerun_ends_bitwise_equal(rl_ref, sft_dir, tiny_tokenizer_dir, tmp_path):
    """Plain python gets SIGTERM after its first checkpoint: it saves and exits 143; rerunning under torchrun
    finishes with the weights and metrics of the uninterrupted run."""
    code, out = interrupt_after_first_checkpoint(rl_command(sft_dir, tiny_tokenizer_dir, tmp_path, nproc=None),
                                                 signal.SIGTERM)
    assert code == PREEMPTED_EXIT_CODE, out[-2000:]
    stopped = latest_checkpoint(tmp_path)
    assert stopped is not None and "Traceback" not in out and not (tmp_path / "metrics.json").exists()
    run_ok(rl_command(sft_dir, tiny_tokenizer_dir, tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == int(stopped.name.split("_")[1]) > 0
    assert deterministic(metrics) == deterministic(json.loads((rl_ref / "metrics.json").read_text()))
    assert same_weights(tmp_path, rl_ref)


def right_answer_logprob(model_dir: Path, tokenizer: Tokenizer, questions: list[dict]) -> float:
    """Mean log-probability the model gives the right '#### N' answers."""
    model, _ = load_model(model_dir, "cpu")
    total = 0.0
    for q in questions:
        ids, mask = tokenizer.render_conversation(
            {"messages": [q["messages"][0], {"role": "assistant", "content": f"#### {q['answer']}"}]})
        y = [t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]
        with torch.no_grad():
            total -= model(torch.tensor([ids[:-1]]), torch.tensor([y]), loss_reduction="none").sum().item()
    return total / len(questions)


def test_rl_makes_right_answers_more_likely(sft_dir, tokenizer, tiny_tokenizer_dir, tmp_path):
    """The sign check: rewarded samples must gain probability (in-process, plain Python, upstream's LRs)."""
    config = rl.RLConfig(**{**TINY_RL, "num_iterations": 8, "device_batch_size": 4, "eval_every": -1,
                            "max_eval": 1, "save_every": -1})
    rl.train(config, sft_dir, tiny_tokenizer_dir, tmp_path)
    questions = rl.train_questions(config)
    before, after = (right_answer_logprob(d, tokenizer, questions) for d in (sft_dir, tmp_path))
    assert after > before


def test_two_ranks_under_torchrun(sft_dir, tiny_tokenizer_dir, tmp_path):
    run_ok(rl_command(sft_dir, tiny_tokenizer_dir, tmp_path, nproc=2, num_iterations=2, save_every=-1))
    ckpt = latest_checkpoint(tmp_path)
    assert {"optim_rank0.pt", "optim_rank1.pt", "state_rank1.pt", "COMPLETE"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["loss"]) and 0.0 <= metrics["GSM8K"] <= 1.0
    assert all(torch.isfinite(w).all() for w in weights(tmp_path).values())


def test_bad_input_exits_2_with_a_one_line_error(sft_dir, tiny_tokenizer_dir, tmp_path, capsys):
    cases = [
        (["--model", str(sft_dir), "--num-samples", "1"], "RLConfig.num_samples"),
        (["--model", str(sft_dir), "--max-eval", "0"], "RLConfig.max_eval"),
        (["--model", str(tmp_path / "missing")], "missing"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            rl.main(["--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "out"), "--device-type", "cpu",
                     *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
