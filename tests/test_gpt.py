"""GPT: shapes, softcap, init, the depth dial, training on one batch, KV-cache decoding, GQA, bad input."""

import math

import pytest
import torch

from nanochat_core.engine import KVCache
from nanochat_core.gpt import GPT, SOFTCAP, GPTConfig, config_for_depth
from nanochat_core.muon import Muon

TINY = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)


def TinyKVCache(config: GPTConfig = TINY, batch_size: int = 1) -> KVCache:
    """The engine's cache (the model's gpt.InferenceCache), growing as needed."""
    return KVCache(batch_size, config.n_kv_head, 8, config.head_dim, config.n_layer)


def random_model(config: GPTConfig, seed: int = 0, std: float = 0.1) -> GPT:
    """Every weight random (SEED init zeroes lm_head and the projections, which would hide attention bugs)."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def tokens(shape, vocab=256, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_losses():
    model = random_model(TINY)
    x, y = tokens((3, 16)), tokens((3, 16), seed=1)
    logits = model(x)
    assert logits.shape == (3, 16, 256) and logits.dtype == torch.float32
    loss = model(x, y)
    assert loss.ndim == 0
    per_token = model(x, y, loss_reduction="none")
    assert per_token.shape == (48,)
    assert torch.allclose(per_token.mean(), loss)
    y_masked = y.clone()
    y_masked[:, :8] = -1  # ignored positions: zero loss, and left out of the mean
    per_token = model(x, y_masked, loss_reduction="none").view(3, 16)
    assert torch.all(per_token[:, :8] == 0)
    assert torch.allclose(model(x, y_masked), per_token[:, 8:].mean())


def lm_head_input_and_output(model: GPT, x: torch.Tensor):
    captured = {}
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: captured.update(raw=out))
    logits = model(x)
    hook.remove()
    return logits, captured["raw"]


def test_logits_softcapped():
    model = random_model(TINY, std=1.0)  # large weights: raw logits far beyond the cap
    logits, raw = lm_head_input_and_output(model, tokens((2, 16)))
    assert raw.abs().max() > SOFTCAP
    assert logits.abs().max() <= SOFTCAP
    assert torch.allclose(logits, SOFTCAP * torch.tanh(raw / SOFTCAP))


def test_softcap_in_float32_under_bf16_autocast():
    model = random_model(TINY, std=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, raw = lm_head_input_and_output(model, tokens((2, 16)))
    assert raw.dtype == torch.bfloat16 and logits.dtype == torch.float32
    expected = SOFTCAP * torch.tanh(raw.float() / SOFTCAP)
    in_bf16 = (SOFTCAP * torch.tanh(raw / SOFTCAP)).float()
    assert (in_bf16 - expected).abs().max() > 1e-3  # so this test tells the two apart
    assert torch.allclose(logits, expected, atol=1e-5)


def test_init():
    model = GPT(config_for_depth(4, 512, 64))
    model.init_weights()
    C = model.config.n_embd
    assert torch.all(model.lm_head.weight == 0)
    for block in model.transformer.h:
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    block = model.transformer.h[0]
    # std = 1/sqrt(fan_in) * min(1, sqrt(fan_out / fan_in))
    assert block.attn.c_q.weight.std().item() == pytest.approx(C**-0.5, rel=0.05)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(C**-0.5, rel=0.05)
    # zero lm_head: the first loss is exactly that of a uniform guess
    x = tokens((2, 16), vocab=512)
    assert model(x, x).item() == pytest.approx(math.log(512), abs=1e-5)


def test_meta_device_build_then_init():
    """What the training loops do: build on meta, materialise, init (which also fills the rotary tables)."""
    with torch.device("meta"):
        model = GPT(TINY)
    model.to_empty(device="cpu")
    model.init_weights()
    reference = GPT(TINY)
    assert torch.equal(model.cos, reference.cos) and torch.equal(model.sin, reference.sin)
    assert torch.isfinite(model(tokens((1, 8)))).all()


@pytest.mark.parametrize("depth, n_embd, n_head", [(1, 64, 1), (2, 128, 1), (3, 192, 3), (4, 256, 2),
                                                   (12, 768, 6), (20, 1280, 10), (21, 1344, 21)])
def test_config_for_depth(depth, n_embd, n_head):
    config = config_for_depth(depth, vocab_size=65536, sequence_len=2048)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (depth, n_embd, n_head, n_head)
    assert config.n_embd % config.n_head == 0 and (config.n_embd // config.n_head) in (64, 128)


def test_d20_matches_reference_size_and_flops():
    """nanochat's d20 speedrun model: 560,988,160 parameters, about 3.49e9 training FLOPs per token."""
    with torch.device("meta"):
        model = GPT(config_for_depth(20, vocab_size=65536, sequence_len=2048))
    assert model.num_params() == 560_988_160
    assert model.estimate_flops() == pytest.approx(3.49e9, rel=1e-3)
    non_embedding = 560_988_160 - 65536 * 1280
    assert model.estimate_flops() == 6 * non_embedding + 12 * 20 * 10 * 128 * 2048


def test_setup_optimizers():
    model = GPT(config_for_depth(4, 256, 32))
    model.init_weights()
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    scale = (256 / 768) ** -0.5
    lrs = {id(g["params"][0]): g["lr"] for g in adamw.param_groups}
    assert lrs[id(model.lm_head.weight)] == pytest.approx(0.004 * scale)
    assert lrs[id(model.transformer.wte.weight)] == pytest.approx(0.2 * scale)
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-10
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_params == {id(p) for p in model.transformer.h.parameters()}
    assert all(g["lr"] == 0.02 and g["momentum"] == 0.95 and g["nesterov"] for g in muon.param_groups)
    all_params = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(all_params) == len(list(model.parameters())) == len({id(p) for p in all_params})
    assert all(g["initial_lr"] == g["lr"] for opt in (adamw, muon) for g in opt.param_groups)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(config_for_depth(2, vocab_size=256, sequence_len=32))
    model.init_weights()
    optimizers = model.setup_optimizers()
    x, y = tokens((4, 32)), tokens((4, 32), seed=1)
    losses = []
    for _ in range(30):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), abs=1e-4)
    assert losses[-1] < 0.2 * losses[0], losses


@pytest.mark.parametrize("n_head, n_kv_head", [(4, 4), (4, 2), (4, 1)])
def test_kv_cache_decoding_matches_full_forward(n_head, n_kv_head):
    config = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=64)
    model = random_model(config)
    x = tokens((2, 14))
    with torch.no_grad():
        full = model(x)
        cache = TinyKVCache(config, batch_size=2)
        # prefill (Tq == Tk: causal), a chunk after a prefix (prefix visible + causal), then one token at a time
        pieces = [model(x[:, :6], kv_cache=cache), model(x[:, 6:10], kv_cache=cache)]
        pieces += [model(x[:, t:t + 1], kv_cache=cache) for t in range(10, 14)]
    assert cache.get_pos() == 14
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


def test_decoding_past_the_training_length():
    model = random_model(TINY)
    cache = TinyKVCache()
    with torch.no_grad():
        model(tokens((1, TINY.sequence_len)), kv_cache=cache)
        logits = model(tokens((1, 1)), kv_cache=cache)  # position 32 > sequence_len: the rotary table has 10x
    assert torch.isfinite(logits).all()


def test_gqa_equals_mha_with_shared_kv_heads():
    """Query head h reads kv head h // (n_head / n_kv_head): GQA equals MHA with each kv head's weights repeated."""
    gqa_config = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    mha_config = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    gqa, mha = random_model(gqa_config), random_model(mha_config, seed=1)
    assert gqa.transformer.h[0].attn.c_k.weight.shape == (32, 64)
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith(("c_k.weight", "c_v.weight")):
            state[name] = w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    x = tokens((2, 16))
    with torch.no_grad():
        assert (gqa(x) - mha(x)).abs().max() <= 1e-5


def test_bad_input_raises_clear_errors():
    model = random_model(TINY)
    with pytest.raises(ValueError, match="idx"):
        model(tokens((16,)))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets"):
        model(tokens((2, 8)), tokens((2, 7)))
    with pytest.raises(ValueError, match="loss_reduction"):
        model(tokens((2, 8)), tokens((2, 8)), loss_reduction="sum")
    with pytest.raises(ValueError, match="rotary"):
        model(tokens((1, 10 * TINY.sequence_len + 1)))
    with pytest.raises(ValueError, match="n_head"):
        GPT(GPTConfig(n_embd=100, n_head=3, n_kv_head=3))
    with pytest.raises(ValueError, match="n_kv_head"):
        GPT(GPTConfig(n_embd=64, n_head=4, n_kv_head=3))
    with pytest.raises(ValueError, match="depth"):
        config_for_depth(0, 256, 32)
