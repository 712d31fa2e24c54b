"""The 2026 model features: every combination decodes like the full forward through every inference path
(engine KVCache, the batching server's prefill/decode/padded decode), the window rule, init, validation."""

import dataclasses
import itertools

import pytest
import torch

from nanochat_core.engine import KVCache
from nanochat_core.gpt import GPT, GPTConfig, config_for_depth, config_for_depth_2026
from nanochat_core.serve.batching import SlotCache, decode, decode_padded, prefill

FEATURES = ("value_embeds", "residual_scalars", "smear", "backout", "sliding_window")
# n_layer 4 so that SSSL has short layers; T past 129 so that the short window (128 keys back) takes effect
BASE = GPTConfig(sequence_len=256, vocab_size=200, n_layer=4, n_head=2, n_kv_head=1, n_embd=64, qk_gain=1.2,
                 rope_base=100000.0, vocab_pad_to=64, recipe="2026")


def config_with(features: set[str]) -> GPTConfig:
    return dataclasses.replace(BASE, window_pattern="SSSL" if "sliding_window" in features else "L",
                               **{f: f in features for f in FEATURES if f != "sliding_window"})


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """2026 init, then every weight perturbed (zero projections and a zero smear_lambda would hide bugs)."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokens(shape, seed=0) -> torch.Tensor:
    return torch.randint(0, BASE.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


COMBINATIONS = [set(c) for n in range(len(FEATURES) + 1) for c in itertools.combinations(FEATURES, n)]  # all 32


@pytest.mark.parametrize("features", COMBINATIONS, ids=lambda f: "+".join(sorted(f)) or "none")
def test_incremental_decode_equals_the_full_forward_on_every_path(features):
    model = random_model(config_with(features))
    x = tokens((2, 150))
    with torch.no_grad():
        full = model(x)
        # engine: a prefill, a chunk after a prefix, then one token at a time (past the 128-key window)
        cache = KVCache(2, BASE.n_kv_head, 16, BASE.head_dim, BASE.n_layer)
        pieces = [model(x[:, :100], kv_cache=cache), model(x[:, 100:135], kv_cache=cache)]
        pieces += [model(x[:, t:t + 1], kv_cache=cache) for t in range(135, 150)]
        assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-4
        # batching server: each row prefilled into its own slot at a different length, then decoded together
        slots = SlotCache(model.config, 4)
        lengths = [130, 120]
        first = [prefill(model, slots, row, x[row, :n].tolist()) for row, n in enumerate(lengths)]
        for row, n in enumerate(lengths):
            assert (first[row][0] - full[row, n - 1]).abs().max() <= 1e-4
        for step in range(15):
            positions = [n + step for n in lengths]
            last = [x[row, p].item() for row, p in enumerate(positions)]
            logits = decode(model, slots, last, positions)
            for row, p in enumerate(positions):
                assert (logits[row] - full[row, p]).abs().max() <= 1e-4
        # the static-shape decode that CUDA graphs replay gives the same logits
        positions = [n + 15 for n in lengths]
        last = [x[row, p].item() for row, p in enumerate(positions)]
        slots_copy = (slots.k.clone(), slots.v.clone(), None if slots.prev is None else slots.prev.clone())
        plain = decode(model, slots, last, positions)
        slots.k, slots.v, slots.prev = slots_copy
        padded = decode_padded(model, slots, torch.tensor(last + [0, 0]), torch.tensor(positions + [0, 0]))
        assert (padded[:2] - plain).abs().max() <= 1e-5


def test_windows_follow_upstreams_rule():
    """S = ceil(T/4/128)*128 keys back, the pattern tiled, the last layer always full (upstream HEAD)."""
    def windows(seq, n_layer, pattern="SSSL"):
        return GPTConfig(sequence_len=seq, n_layer=n_layer, window_pattern=pattern).windows()

    assert windows(256, 4) == [128, 128, 128, None]
    assert windows(512, 4)[0] == 128 and windows(1024, 4)[0] == 256 and windows(2048, 4)[0] == 512
    assert windows(2048, 6, "SL") == [512, None, 512, None, 512, None]
    assert windows(2048, 3, "S") == [512, 512, None]
    assert GPTConfig().windows() == [None] * 12


def test_a_sliding_window_hides_keys_older_than_the_window():
    """With every layer but the last windowed, and the last one seeing only itself through... a 1-layer check:
    a short-window attention layer's output at position p ignores tokens more than 128 back."""
    config = dataclasses.replace(config_with({"sliding_window"}), n_layer=2, window_pattern="S")
    model = random_model(config)
    x = tokens((1, 200))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % BASE.vocab_size
    with torch.no_grad():
        h_x = model.transformer.h[0].attn(torch.nn.functional.rms_norm(model.transformer.wte(x), (64,)),
                                          (model.cos[:, :200], model.sin[:, :200]), model.windows[0])
        h_y = model.transformer.h[0].attn(torch.nn.functional.rms_norm(model.transformer.wte(y), (64,)),
                                          (model.cos[:, :200], model.sin[:, :200]), model.windows[0])
    changed = ((h_x - h_y).abs().amax(dim=-1) > 0)[0]
    assert changed[10:139].all()  # positions 10..138 see key 10 (138 - 10 = 128)
    assert not changed[139:].any() and not changed[:10].any()


def test_smear_mixes_in_the_previous_token_only():
    config = config_with({"smear"})
    model = random_model(config)
    x = tokens((1, 20))
    y = x.clone()
    y[0, 5] = (y[0, 5] + 1) % BASE.vocab_size
    with torch.no_grad():
        ex = torch.nn.functional.rms_norm(model.transformer.wte(x), (64,))
        ey = torch.nn.functional.rms_norm(model.transformer.wte(y), (64,))
        sx, sy = model._smear(ex, None), model._smear(ey, None)
    changed = ((sx - sy).abs().amax(dim=-1) > 0)[0].tolist()
    assert changed == [i in (5, 6) for i in range(20)]


def test_2026_depth_dial_and_parameters():
    c = config_for_depth_2026(24, 32768, 2048)
    assert (c.n_embd, c.n_head, c.window_pattern, c.qk_gain, c.rope_base, c.vocab_pad_to) == \
        (1536, 12, "SSSL", 1.2, 100000.0, 64)
    c4 = config_for_depth_2026(4, 1000, 256)
    assert (c4.n_embd, c4.n_head, c4.padded_vocab_size) == (256, 2, 1024)
    with torch.device("meta"):
        model = GPT(c4)
    names = dict(model.named_parameters())
    assert names["value_embeds.3.weight"].shape == (1024, 256) and "value_embeds.2.weight" not in names
    assert names["transformer.h.1.attn.ve_gate.weight"].shape == (2, 12)
    assert {"resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda"} <= set(names)
    # the November config has exactly the November parameters
    with torch.device("meta"):
        nov = GPT(config_for_depth(4, 1000, 256))
    assert all(n.startswith(("transformer.wte", "transformer.h.", "lm_head")) for n, _ in nov.named_parameters())
    assert "ve_gate" not in str(list(dict(nov.named_parameters())))


def test_2026_init_matches_upstreams_scheme():
    config = config_with(set(FEATURES))
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    assert torch.allclose(model.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    assert torch.allclose(model.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert (model.transformer.h[0].attn.c_proj.weight == 0).all()
    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.05
    assert model.lm_head.weight.std().item() < 0.002
    gate = model.transformer.h[1].attn.ve_gate.weight
    assert (gate >= 0).all() and (gate <= 0.02).all()


def test_padded_vocab_logits_are_sliced_back():
    model = random_model(config_with(set()))
    assert model.lm_head.weight.shape[0] == 256  # 200 padded to a multiple of 64
    with torch.no_grad():
        assert model(tokens((1, 8))).shape == (1, 8, 200)


@pytest.mark.parametrize("field, value, message", [
    ("window_pattern", "SXL", "window_pattern"), ("window_pattern", "", "window_pattern"),
    ("qk_gain", float("nan"), "qk_gain"), ("rope_base", 0.0, "rope_base"), ("softcap", -1.0, "softcap"),
    ("rotary_dtype", "float16", "rotary_dtype"), ("recipe", "2027", "recipe"), ("smear", 1, "smear"),
    ("vocab_pad_to", 0, "vocab_pad_to"),
])
def test_bad_feature_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPT(dataclasses.replace(BASE, **{field: value}))


def test_old_checkpoint_configs_load_with_november_defaults():
    old = {"sequence_len": 256, "vocab_size": 1000, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 128}
    config = GPTConfig.from_dict(old)
    assert (config.window_pattern, config.smear, config.rope_base, config.recipe) == ("L", False, 10000.0, "nov2025")
    with pytest.raises(ValueError, match="no field"):
        GPTConfig.from_dict({**old, "mtp_n": 2})
