"""Checkpoints: round trip (weights, optimizer shards, loader state, RNG), atomic commit, pruning, damage."""

import json
import random

import pytest
import torch

from nanochat_core.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    load_rank_state,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    save_final_model,
)
from nanochat_core.common import DistInfo
from nanochat_core.gpt import GPT, config_for_depth

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config_for_depth(1, vocab_size=96, sequence_len=16))
    model.init_weights()
    return model


def train_step(model: GPT, optimizers, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 96, (2, 16), generator=g)
    model(x, x.roll(-1, dims=1)).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def meta_for(model: GPT) -> dict:
    return {"model_config": model.config.to_dict(), "stage": "test"}


def test_round_trip_resumes_training_bitwise(tmp_path):
    model = tiny_model()
    opts = model.setup_optimizers()
    train_step(model, opts, seed=1)
    loader_state = {"epoch": 1, "cursor": 3, "offset": 17}
    path = save_checkpoint(tmp_path, 5, model, opts, meta_for(model), CPU, loader_state,
                           rank_state={"token_counts": torch.arange(96)})
    assert path == tmp_path / "checkpoints" / "step_000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE", "loader_rank0.json", "meta.json", "model.pt", "optim_rank0.pt", "state_rank0.pt"]

    model_state, optim_states, meta, loaded_loader = load_checkpoint(path, "cpu")
    assert meta["step"] == 5 and meta["world_size"] == 1 and meta["stage"] == "test"
    assert loaded_loader == loader_state
    assert torch.equal(load_rank_state(path)["token_counts"], torch.arange(96))

    resumed = tiny_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(model_state)
    resumed_opts = resumed.setup_optimizers()
    for opt, state in zip(resumed_opts, optim_states, strict=True):
        opt.load_state_dict(state)
    train_step(model, opts, seed=2)
    train_step(resumed, resumed_opts, seed=2)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_rng_state_round_trip(tmp_path):
    model = tiny_model()
    torch.manual_seed(7)
    random.seed(7)
    path = save_checkpoint(tmp_path, 1, model, [], meta_for(model), CPU, None)
    expected = (torch.rand(4), random.random())
    torch.manual_seed(999)
    random.seed(999)
    restore_rng_state(load_rank_state(path)["rng"], torch.device("cpu"))
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]
    assert set(rng_state(torch.device("cpu"))) == {"torch", "python"}


def test_latest_ignores_tmp_and_unmarked_dirs_and_keeps_newest(tmp_path):
    model = tiny_model()
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, [], meta_for(model), CPU, None, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]
    (root / ".tmp-step_000009").mkdir()  # a save that crashed half way
    (root / "step_000008").mkdir()  # renamed by hand, no COMPLETE marker
    assert latest_checkpoint(tmp_path) == root / "step_000003"
    save_checkpoint(tmp_path, 4, model, [], meta_for(model), CPU, None, keep=2)
    assert not (root / ".tmp-step_000009").exists()  # leftovers are cleaned at the next save
    assert latest_checkpoint(tmp_path) == root / "step_000004"


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path, 2, model, [], {**meta_for(model), "tag": "a"}, CPU, None)
    path = save_checkpoint(tmp_path, 2, model, [], {**meta_for(model), "tag": "b"}, CPU, None)
    assert json.loads((path / "meta.json").read_text())["tag"] == "b"


@pytest.mark.parametrize("name", ["model.pt", "optim_rank0.pt"])
def test_truncated_file_is_a_clear_error(tmp_path, name):
    model = tiny_model()
    path = save_checkpoint(tmp_path, 1, model, model.setup_optimizers(), meta_for(model), CPU, None)
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(path, "cpu")


def test_missing_shard_and_incomplete_dir_are_clear_errors(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path, 1, model, [], meta_for(model), CPU, None)
    with pytest.raises(CheckpointError, match="no shard for rank 1"):
        load_checkpoint(path, "cpu", rank=1)
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(path, "cpu")


def test_final_model_round_trip(tmp_path):
    model = tiny_model()
    model.lm_head.weight.data.normal_()  # non-zero logits, so the comparison means something
    save_final_model(tmp_path, model, meta_for(model))
    loaded, meta = load_model(tmp_path, "cpu")
    assert meta["model_config"] == model.config.to_dict()
    assert not loaded.training
    x = torch.randint(0, 96, (1, 16))
    assert torch.equal(loaded(x), model(x))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_load_model_errors_name_the_problem(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="model_config"):
        save_final_model(tmp_path, model, {"stage": "x"})
    with pytest.raises(CheckpointError, match="meta.json"):
        load_model(tmp_path, "cpu")
    save_final_model(tmp_path, model, meta_for(model))
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="model.pt"):
        load_model(tmp_path, "cpu")
    save_final_model(tmp_path, model, {"model_config": {**model.config.to_dict(), "n_layer": 2}})
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path, "cpu")
    with pytest.raises(ValueError, match="phase"):
        load_model(tmp_path, "cpu", phase="serve")
