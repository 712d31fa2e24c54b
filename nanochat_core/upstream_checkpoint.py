"""Checkpoints written by upstream nanochat, read into this project's GPT and Tokenizer.

Upstream's layout (both formats):

    $NANOCHAT_BASE_DIR/base_checkpoints/<tag>/model_<step:06d>.pt    torch.save(model.state_dict())
    $NANOCHAT_BASE_DIR/base_checkpoints/<tag>/meta_<step:06d>.json   {"model_config": {...}, "step": ..., ...}
    $NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl                        pickle of a tiktoken Encoding

Two formats are known, told apart by the state dict's keys and the meta's model_config:
- November 2025 ("nov2025"): the blocks, wte and lm_head only; rotary tables held in bfloat16 even on CPU.
- July 2026 ("jul2026"): also resid_lambdas, x0_lambdas, smear, backout, value embeddings with their gates on
  alternating layers, sliding windows (model_config["window_pattern"]), q/k gain 1.2 after QK-norm, RoPE base
  100000, vocabulary padded to a multiple of 64.
Upstream parameter names are this project's names for the same features, so a state dict loads with strict
loading once torch.compile's `_orig_mod.` prefix is stripped and bf16 tensors (GPU checkpoints) are made fp32.

The weights load with torch.load(weights_only=True). tokenizer.pkl is the one pickle there is, and it is read by
an unpickler that admits a single global, tiktoken.core.Encoding, stands in a plain class for it and keeps the
state dict that pickle hands to it (BUILD): tiktoken's object is never constructed from the file. Anything else
(another global, a function call, an opcode a plain Encoding pickle does not use, a state of the wrong shape) is
refused with a TokenizerError that names it. token_bytes.pt is not read: the Tokenizer computes its own.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanochat_core.checkpoint import CheckpointError
from nanochat_core.fileio import sha256_file
from nanochat_core.gpt import GPT, GPTConfig
from nanochat_core.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError

NOV2025 = "nov2025"
JUL2026 = "jul2026"
FORMATS = {NOV2025: "upstream nanochat, November 2025", JUL2026: "upstream nanochat, July 2026"}
MODEL_FILE = re.compile(r"^model_(\d+)\.pt$")
TOKENIZER_PKL = "tokenizer.pkl"
# upstream's checkpoint directories by phase (base_train, mid_train, chat_sft, chat_rl)
PHASE_DIRS = {"base_checkpoints": "base", "mid_checkpoints": "mid", "chatsft_checkpoints": "sft",
              "chatrl_checkpoints": "rl"}
PHASES = ("base", "mid", "sft", "rl")
# model_config keys each format's GPTConfig has (upstream passes the dict straight to GPTConfig(**model_config))
CONFIG_KEYS = {
    NOV2025: {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"},
    JUL2026: {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern"},
}
# top-level keys only the July 2026 model has (value embeddings and gates are checked with the rest of the keys)
JUL2026_SCALARS = ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda", "smear_gate.weight")
MAX_PICKLE_BYTES = 256 << 20  # a 2M-token vocabulary is ~40 MB of pickle; anything far bigger is not a tokenizer


class UpstreamError(CheckpointError):
    """An upstream checkpoint directory, file or format that cannot be imported; the message names it."""


# ---------------------------------------------------------------------------------------------
# finding the files


def checkpoint_steps(ckpt_dir: str | Path) -> dict[int, Path]:
    """{step: model_<step>.pt} of an upstream checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UpstreamError(f"upstream checkpoint directory {ckpt_dir} does not exist (or is not a directory)")
    steps = {}
    for p in ckpt_dir.iterdir():
        m = MODEL_FILE.match(p.name)
        if m and p.is_file():
            steps[int(m.group(1))] = p
    if not steps:
        raise UpstreamError(f"{ckpt_dir} holds no upstream checkpoint: no model_<step>.pt file there")
    return steps


def checkpoint_files(ckpt_dir: str | Path, step: int | None = None) -> tuple[int, Path, Path]:
    """(step, model file, meta file) for `step`, or for the newest step when it is None."""
    steps = checkpoint_steps(ckpt_dir)
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise UpstreamError(f"{ckpt_dir} has no checkpoint for step {step} (it has steps "
                            f"{', '.join(str(s) for s in sorted(steps))})")
    model_path = steps[step]
    meta_path = model_path.with_name(f"meta_{model_path.name[len('model_'):-len('.pt')]}.json")
    if not meta_path.is_file():
        raise UpstreamError(f"{meta_path} is missing: upstream writes it beside {model_path.name}")
    return step, model_path, meta_path


def default_tokenizer_dir(ckpt_dir: str | Path) -> Path:
    """Where the checkpoint's tokenizer is when none is named: upstream's layout first (<base dir>/tokenizer for
    <base dir>/<phase>_checkpoints/<tag>), then a `tokenizer` directory beside the checkpoint directory."""
    ckpt_dir = Path(ckpt_dir).resolve()
    candidates = [ckpt_dir.parent.parent / "tokenizer", ckpt_dir.parent / "tokenizer"]
    for candidate in candidates:
        if (candidate / TOKENIZER_PKL).is_file():
            return candidate
    raise UpstreamError(f"no tokenizer found for {ckpt_dir}: neither {candidates[0]} nor {candidates[1]} holds "
                        f"{TOKENIZER_PKL}; name the tokenizer directory with --tokenizer")


def phase_of(ckpt_dir: str | Path) -> str:
    """The training phase upstream's directory name says (base_checkpoints/<tag> -> base, ...); base otherwise."""
    return PHASE_DIRS.get(Path(ckpt_dir).resolve().parent.name, "base")


# ---------------------------------------------------------------------------------------------
# the model


@dataclass
class UpstreamModel:
    """An upstream checkpoint as this project's model: its config, its weights (fp32, our names), and where it
    came from."""
    format: str
    step: int
    config: GPTConfig
    state: dict[str, torch.Tensor]
    meta: dict[str, Any]  # upstream's meta_<step>.json as it is
    files: dict[str, Path]  # "model", "meta"


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UpstreamError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise UpstreamError(f"{path} has no 'model_config' object: not an upstream nanochat meta file")
    return meta


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """model_<step>.pt as {name: fp32 tensor}: no pickle (weights_only), torch.compile's prefix stripped, bf16
    tensors (upstream saves wte and value embeddings in bf16 on GPUs) made fp32 as upstream does on CPU."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a damaged or non-weights file
        raise UpstreamError(f"{path} cannot be read as upstream weights (truncated, damaged, or more than "
                            f"tensors in it): {' '.join(str(e).split())[:300]}") from e
    if not isinstance(state, dict):
        raise UpstreamError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UpstreamError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            raise UpstreamError(f"{path}: {key} has dtype {value.dtype}; upstream weights are floating point")
        out[key.removeprefix("_orig_mod.")] = value.float()
    return out


def detect_format(state: dict[str, torch.Tensor], model_config: dict[str, Any], source: Path) -> str:
    """nov2025 or jul2026, from the keys (July 2026 has the residual scalars, smear and backout) and model_config
    (July 2026 has window_pattern). A mixture of the two is an upstream version between them: refused."""
    new_keys = [k for k in JUL2026_SCALARS if k in state]
    if not new_keys and "window_pattern" not in model_config:
        return NOV2025
    if len(new_keys) == len(JUL2026_SCALARS):
        return JUL2026
    have = ", ".join(new_keys) or "none of them"
    lacks = ", ".join(k for k in JUL2026_SCALARS if k not in state)
    raise UpstreamError(f"{source}: an upstream format this import does not know: of the July 2026 model's "
                        f"{', '.join(JUL2026_SCALARS)} it has {have} but lacks {lacks} (known formats: "
                        f"{'; '.join(FORMATS.values())})")


def gpt_config(model_config: dict[str, Any], fmt: str, source: Path) -> GPTConfig:
    """Our GPTConfig for an upstream model_config: the feature settings each upstream format fixed in code."""
    unknown = sorted(set(model_config) - CONFIG_KEYS[fmt])
    missing = sorted(CONFIG_KEYS[fmt] - set(model_config) - {"window_pattern"})
    if unknown or missing:
        raise UpstreamError(f"{source}: model_config of the {FORMATS[fmt]} format "
                            + (f"has unknown field(s) {', '.join(unknown)}" if unknown else "")
                            + ("; " if unknown and missing else "")
                            + (f"lacks {', '.join(missing)}" if missing else ""))
    sizes = {k: model_config[k] for k in sorted(CONFIG_KEYS[NOV2025])}
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UpstreamError(f"{source}: model_config.{name} must be a positive int, got {value!r}")
    if fmt == NOV2025:
        # upstream's rotary tables were bf16 even on CPU (activations fp32 times bf16 values)
        features = dict(rotary_dtype="bfloat16", rope_base=10000.0, qk_gain=1.0, softcap=15.0)
    else:
        pattern = model_config.get("window_pattern", "SSSL")  # HEAD's default when an older meta lacks it
        if not isinstance(pattern, str) or not pattern or set(pattern.upper()) - {"S", "L"}:
            raise UpstreamError(f"{source}: model_config.window_pattern must be a string of S and L, got {pattern!r}")
        features = dict(window_pattern=pattern.upper(), value_embeds=True, residual_scalars=True, smear=True,
                        backout=True, qk_gain=1.2, rope_base=100000.0, softcap=15.0, rotary_dtype="float32",
                        vocab_pad_to=64, recipe="2026")
    try:
        config = GPTConfig(**sizes, **features)
        config.validate()
    except (TypeError, ValueError) as e:
        raise UpstreamError(f"{source}: model_config {model_config} does not make a valid model: {e}") from e
    return config


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, fmt: str) -> None:
    """Every key the model has, and no other, with the model's shapes: a clear error before load_state_dict."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}"] if unexpected else [])
        raise UpstreamError(f"{source}: the state dict does not match a {FORMATS[fmt]} model of its meta's "
                            f"model_config: {'; '.join(parts)}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UpstreamError(f"{source}: {key} has shape {list(state[key].shape)}, the model_config gives "
                                f"{list(shape)}")


def read_upstream_model(ckpt_dir: str | Path, step: int | None = None) -> UpstreamModel:
    """The checkpoint of `step` (default: the newest) in an upstream checkpoint directory, checked against the
    model its meta describes."""
    step, model_path, meta_path = checkpoint_files(ckpt_dir, step)
    meta = read_meta(meta_path)
    state = read_state(model_path)
    fmt = detect_format(state, meta["model_config"], model_path)
    config = gpt_config(meta["model_config"], fmt, meta_path)
    with torch.device("meta"):
        check_state(GPT(config), state, model_path, fmt)
    return UpstreamModel(fmt, step, config, state, meta, {"model": model_path, "meta": meta_path})


def build_model(upstream: UpstreamModel, device: torch.device | str = "cpu") -> GPT:
    """Our GPT holding the upstream weights (eval mode)."""
    with torch.device("meta"):
        model = GPT(upstream.config)
    model.to_empty(device=device)
    model.init_weights()  # the non-persistent buffers (rotary tables)
    state = {k: v.to(device) for k, v in upstream.state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# tokenizer.pkl


ENCODING_GLOBAL = ("tiktoken.core", "Encoding")
# Opcodes that a pickle of a tiktoken Encoding (protocols 2-5) is made of: the class, NEWOBJ with no arguments,
# then a dict of str, bytes and int built with memo references, and BUILD. Everything else is refused: REDUCE,
# INST, OBJ and NEWOBJ_EX call things, EXT* and PERSID fetch objects from elsewhere, and lists, sets, tuples of
# values or floats have no place in an Encoding's state.
PICKLE_OPCODES = {
    "PROTO", "FRAME", "STOP", "MARK", "EMPTY_DICT", "SETITEM", "SETITEMS", "EMPTY_TUPLE", "NONE",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
    "BININT", "BININT1", "BININT2", "LONG1",
    "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
    "STACK_GLOBAL", "GLOBAL", "NEWOBJ", "BUILD",
}
STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
MEMO_PUT = {"BINPUT", "LONG_BINPUT"}
MEMO_GET = {"BINGET", "LONG_BINGET"}
STATE_FIELDS = {"name": str, "pat_str": str, "mergeable_ranks": dict, "special_tokens": dict}
OPTIONAL_STATE_FIELDS = {"explicit_n_vocab": (int, type(None))}  # tiktoken's constructor argument, if ever saved


def _refuse(path: Path, what: str) -> TokenizerError:
    return TokenizerError(f"{path} is refused: {what}; a tokenizer.pkl must be a pickle of a tiktoken Encoding "
                          f"(its state: name, pat_str, mergeable_ranks, special_tokens) and nothing else")


def scan_pickle(data: bytes, path: Path) -> None:
    """Check the opcode stream before anything is unpickled: one global, tiktoken.core.Encoding, made with NEWOBJ
    and no arguments and given its state with one BUILD at the end; only plain-data opcodes otherwise."""
    last_pushed: list[Any] = []  # what the latest opcodes pushed (strings resolved through the memo): names a
    memo: dict[int, Any] = {}  # STACK_GLOBAL's module and name in messages
    counts = {"global": 0, "NEWOBJ": 0, "BUILD": 0}
    ops = []
    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if not ops and name != "PROTO":
                raise _refuse(path, f"it does not start as a pickle of protocol 2 or later does (found {name})")
            ops.append(name)
            if name in ("GLOBAL", "STACK_GLOBAL"):
                module, attr = (arg.split(" ", 1) if name == "GLOBAL" else
                                (last_pushed[-2:] if len(last_pushed) >= 2 else [None, None]))
                if (module, attr) != ENCODING_GLOBAL:
                    shown = f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "a global"
                    raise _refuse(path, f"it refers to {shown} (opcode {name} at byte {pos}); the only global "
                                        f"allowed is {'.'.join(ENCODING_GLOBAL)}")
                counts["global"] += 1
            if name not in PICKLE_OPCODES:
                raise _refuse(path, f"it contains opcode {name} at byte {pos}, which a tiktoken Encoding pickle "
                                    "does not use" + (" (it calls a function)" if name in ("REDUCE", "INST", "OBJ",
                                                                                          "NEWOBJ_EX") else ""))
            if name in counts:
                counts[name] += 1
            if name in STRING_OPCODES:
                last_pushed.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = last_pushed[-1] if last_pushed else None
            elif name in MEMO_PUT:
                memo[arg] = last_pushed[-1] if last_pushed else None
            elif name in MEMO_GET:
                last_pushed.append(memo.get(arg))
            elif name not in ("PROTO", "FRAME"):
                last_pushed.append(None)
    except TokenizerError:
        raise
    except ValueError as e:  # pickletools: an unknown opcode or data that ends early
        raise TokenizerError(f"{path} is not a complete pickle (truncated or damaged): {e}") from e
    if ops[-2:] != ["BUILD", "STOP"] or any(n != 1 for n in counts.values()):
        raise _refuse(path, f"its structure is not one Encoding given its state: {counts['global']} global(s), "
                            f"{counts['NEWOBJ']} NEWOBJ, {counts['BUILD']} BUILD, ending with {', '.join(ops[-2:])}")


class _EncodingStandIn:
    """What tokenizer.pkl's Encoding becomes here: an object that only keeps the state pickle gives it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # only a call (REDUCE) gets here; NEWOBJ does not
        raise pickle.UnpicklingError("it calls tiktoken.core.Encoding (REDUCE); a pickled Encoding is made with NEWOBJ")

    def __setstate__(self, state: Any) -> None:
        self.state = state


class EncodingUnpickler(pickle.Unpickler):
    """An unpickler whose only global is a stand-in for tiktoken.core.Encoding, and which fetches no persistent
    objects: whatever the stream, nothing but plain data and that stand-in can be made."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ENCODING_GLOBAL:
            return _EncodingStandIn
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; the only global allowed is "
                                     f"{'.'.join(ENCODING_GLOBAL)}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"it asks for a persistent object {pid!r:.60}")


def encoding_state(path: str | Path) -> dict[str, Any]:
    """The state dict tokenizer.pkl holds for its tiktoken Encoding, read without constructing the Encoding."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file missing: {path}")
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise _refuse(path, f"it is {size:,} bytes, more than any tokenizer's {MAX_PICKLE_BYTES:,}")
    data = path.read_bytes()
    scan_pickle(data, path)
    try:
        obj = EncodingUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise _refuse(path, str(e)) from e
    except Exception as e:  # noqa: BLE001 - damaged data makes the unpickler raise almost anything
        raise TokenizerError(f"{path} is not a readable pickle (truncated or damaged): {type(e).__name__}: {e}") from e
    if not isinstance(obj, _EncodingStandIn) or not hasattr(obj, "state"):
        raise _refuse(path, f"it holds a {type(obj).__name__}, not an Encoding with its state")
    if not isinstance(obj.state, dict):
        raise _refuse(path, f"the Encoding's state is a {type(obj.state).__name__}"
                            + (f" ({obj.state!r:.40}: a tiktoken registry name, not a tokenizer's data)"
                               if isinstance(obj.state, str) else "") + ", not a dict")
    return obj.state


def check_encoding_state(state: dict[str, Any], path: Path) -> tuple[dict[bytes, int], str]:
    """(mergeable_ranks, pattern) of an Encoding's state, checked: the known fields with their types, ranks
    0..n-1 over distinct byte strings including all 256 single bytes, and this project's 9 special tokens right
    after them in its order."""
    where = f"{path}: the Encoding's state"
    unknown = sorted(str(k) for k in state if k not in STATE_FIELDS and k not in OPTIONAL_STATE_FIELDS)
    missing = sorted(k for k in STATE_FIELDS if k not in state)
    if unknown or missing:
        raise TokenizerError(f"{where} " + "; ".join(
            ([f"has unknown field(s) {', '.join(unknown)}"] if unknown else [])
            + ([f"lacks {', '.join(missing)}"] if missing else [])))
    for name, kind in {**STATE_FIELDS, **OPTIONAL_STATE_FIELDS}.items():
        if name in state and (not isinstance(state[name], kind) or isinstance(state[name], bool)):
            raise TokenizerError(f"{where}: {name} is a {type(state[name]).__name__}")
    ranks = state["mergeable_ranks"]
    for token, rank in ranks.items():
        if not isinstance(token, bytes) or not isinstance(rank, int) or isinstance(rank, bool):
            raise TokenizerError(f"{where}: mergeable_ranks maps {type(token).__name__} to {type(rank).__name__} "
                                 f"({token!r:.40} -> {rank!r:.20}); it must map bytes to int")
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise TokenizerError(f"{where}: the {n} mergeable_ranks are not the ranks 0..{n - 1} (gaps or repeats)")
    lacking = [i for i in range(256) if bytes([i]) not in ranks]
    if lacking:
        raise TokenizerError(f"{where}: mergeable_ranks lacks {len(lacking)} single-byte token(s), e.g. "
                             f"{bytes([lacking[0]])!r}: text with those bytes could not be encoded")
    expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    specials = state["special_tokens"]
    if specials != expected:
        raise TokenizerError(f"{where}: special_tokens {specials!r:.300} differ from nanochat's {len(SPECIAL_TOKENS)} "
                             f"special tokens in order after the {n} ranks: {expected}")
    vocab = state.get("explicit_n_vocab")
    if vocab is not None and vocab != n + len(SPECIAL_TOKENS):
        raise TokenizerError(f"{where}: explicit_n_vocab {vocab} != {n} ranks + {len(SPECIAL_TOKENS)} specials")
    return ranks, state["pat_str"]


def read_tokenizer_pkl(path: str | Path) -> Tokenizer:
    """Our Tokenizer from upstream's tokenizer.pkl (or a directory holding it), with upstream's split pattern."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_PKL
    ranks, pattern = check_encoding_state(encoding_state(path), path)
    try:
        return Tokenizer(ranks, pattern)
    except ValueError as e:  # tiktoken refuses the pattern (a regex it cannot compile)
        raise TokenizerError(f"{path}: tiktoken cannot use its pat_str {pattern!r:.80}: {e}") from e


def source_digests(files: dict[str, Path]) -> dict[str, str]:
    """{file name: sha256} of the files an import read, for the artifact's provenance."""
    return {p.name: sha256_file(p) for p in files.values()}
