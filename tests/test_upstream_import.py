"""`nanochat import --upstream` and `nanochat_core.load_model` on the two checkpoints upstream's own code wrote
(../shared/data/upstream: seed = November 2025 format, head = July 2026 format, README there).

1. each imported model reproduces upstream's reference outputs: logits (max |diff| <= 1e-4), loss, greedy tokens
   from the KV-cache engine and from a naive loop, and the tokenizer its chat rendering exactly;
2. the artifact is a model of the store like a trained one: the serve/chat CLI's loader, the evaluate flow's and the
   SFT/RL stages' model loading take it, the chat server answers with it, a re-import finds it, a damaged one is
   written anew;
3. tokenizer.pkl: hostile or malformed pickles are refused with an error naming what was found, and nothing runs;
4. bad input on the command line: one line `nanochat: error: ...` naming the path, exit 2, nothing in the store.
"""

import copyreg
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tiktoken
import torch
from test_s3 import BUCKET, moto  # noqa: F401 - moto is a fixture (moto_server on a free port)
from test_server import greedy_reply, running

import nanochat_core
from flows import cli
from nanochat_core.engine import Engine
from nanochat_core.pipeline import artifacts, stages
from nanochat_core.pipeline.artifacts import ArtifactError
from nanochat_core.pipeline.import_upstream import MODEL_STAGE, TOKENIZER_STAGE, import_upstream
from nanochat_core.tokenizer import TokenizerError
from nanochat_core.upstream_checkpoint import (
    JUL2026,
    NOV2025,
    EncodingUnpickler,
    UpstreamError,
    read_tokenizer_pkl,
    read_upstream_model,
)

REPO = Path(__file__).resolve().parents[1]
SETS = {"seed": NOV2025, "head": JUL2026}


@pytest.fixture(scope="module")
def upstream_data(shared_data) -> Path:
    root = shared_data / "upstream"
    if not (root / "seed" / "reference.pt").is_file():
        pytest.fail(f"upstream test checkpoints not found in {root}")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module", params=list(SETS))
def imported(request, upstream_data, store):
    """(set name, import result, reference outputs) for each set, imported into one store."""
    root = upstream_data / request.param
    result = import_upstream(root / "checkpoint", store, tokenizer_dir=root / "tokenizer", say=lambda _: None)
    return request.param, result, torch.load(root / "reference.pt", weights_only=True)


def naive_greedy(model, prompt: list[int], steps: int = 32) -> list[int]:
    """Upstream's model.generate at temperature 0: the whole sequence through the model for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------------------------------------
# 1. upstream's outputs


def test_imported_model_reproduces_upstream(imported):
    name, result, ref = imported
    assert result.format == SETS[name] and result.step == 0 and result.phase == "base"
    model, tokenizer = nanochat_core.load_model(result.model.uri)
    assert not model.training
    with torch.no_grad():
        logits = model(ref["input_ids"])
        long_logits = model(ref["long_input_ids"])
        loss = model(ref["input_ids"], ref["targets"])
    diff = (logits - ref["logits"]).abs().max().item()
    long_diff = (long_logits - ref["long_logits"]).abs().max().item()
    print(f"{name}: max |logits diff| {diff:.3g}, long {long_diff:.3g}, loss {loss.item():.7f} vs "
          f"{ref['loss'].item():.7f}")
    assert logits.dtype == torch.float32 and logits.shape == ref["logits"].shape
    assert diff <= 1e-4 and long_diff <= 1e-4
    assert abs(loss.item() - ref["loss"].item()) <= 1e-5

    assert tokenizer.encode("The capital of France is", prepend="<|bos|>") == ref["prompt_ids"]
    engine = Engine(model, tokenizer)
    for prompt, kv_key, naive_key in [("prompt_ids", "greedy", "greedy_naive"),
                                      ("long_prompt_ids", "greedy_long", "greedy_long_naive")]:
        out, _ = engine.generate_batch(ref[prompt], num_samples=1, max_tokens=32, temperature=0.0)
        assert out[0][len(ref[prompt]):] == ref[kv_key], f"{name} {kv_key}"
        assert naive_greedy(model, ref[prompt]) == ref[naive_key], f"{name} {naive_key}"


@pytest.mark.parametrize("name", list(SETS))
def test_tokenizer_renders_conversations_as_upstream(upstream_data, name):
    ref = torch.load(upstream_data / name / "reference.pt", weights_only=True)
    tokenizer = read_tokenizer_pkl(upstream_data / name / "tokenizer")
    render = ref["chat_render"]
    conversation = json.loads(render["conversation_json"])
    ids, mask = tokenizer.render_conversation(conversation)
    assert ids == render["ids"] and mask == render["mask"]
    assert tokenizer.render_for_completion(conversation) == render["completion_ids"]
    assert tokenizer.get_vocab_size() == 1024 and tokenizer.get_bos_token_id() == 1015
    # token ids are upstream's: its own tiktoken Encoding (the file unpickled for real, here only) encodes alike
    with open(upstream_data / name / "tokenizer" / "tokenizer.pkl", "rb") as f:
        theirs = pickle.load(f)  # noqa: S301 - the test's trusted copy, to compare with
    text = "Hello world! 12345 ünïcödé 你好 \t\n x"
    assert tokenizer.encode(text) == theirs.encode_ordinary(text)
    assert tokenizer.pattern == theirs._pat_str


# ---------------------------------------------------------------------------------------------
# 2. a model of the store like any other


def test_artifact_records_provenance_and_names_its_tokenizer(imported, upstream_data):
    name, result, _ = imported
    manifest = artifacts.read_manifest(result.model.uri)
    assert manifest["stage"] == MODEL_STAGE and result.model.uri.split("/")[-2] == MODEL_STAGE
    config = manifest["config"]
    assert config["format"] == SETS[name] and config["step"] == 0
    assert config["source"] == str((upstream_data / name / "checkpoint").resolve())
    assert set(config["sha256"]) == {"model_000000.pt", "meta_000000.json", "tokenizer.pkl"}
    meta = json.loads((Path(result.model.uri) / "meta.json").read_text())
    assert meta["stage"] == "base" and meta["step"] == 0 and meta["imported_from"] == config
    assert manifest["inputs"]["tokenizer"] == f"{TOKENIZER_STAGE}/{result.tokenizer.uri.split('/')[-1]}"
    assert stages.model_tokenizer(result.model.uri) == result.tokenizer


def test_serve_chat_evaluate_and_training_stages_load_it(imported):
    """Each consumer's own loading code: the serve/chat CLI's, the evaluate flow's, and the previous-stage
    loader of mid/SFT/RL."""
    from nanochat_core.checkpoint import checkpoint_meta, load_model
    from nanochat_core.tokenizer import Tokenizer
    from nanochat_core.train.common import load_upstream_model

    name, result, ref = imported
    model_dir, tok_dir = cli._model_and_tokenizer(result.model.uri)  # nanochat serve / nanochat chat
    model, _ = load_model(model_dir, "cpu")
    tokenizer = Tokenizer.load(tok_dir)
    with torch.no_grad():
        assert (model(ref["input_ids"]) - ref["logits"]).abs().max() <= 1e-4
    # the evaluate flow: model digest, tokenizer, phase (which tasks "auto" picks)
    assert stages.model_ref(result.model.uri) == result.model
    assert checkpoint_meta(stages.local_model(result.model.uri))["stage"] == "base"
    # mid / SFT / RL: the previous stage's model, checked against the tokenizer
    trainable, _ = load_upstream_model(model_dir, tokenizer.get_vocab_size(), torch.device("cpu"))
    assert trainable.training and trainable.config == model.config


def test_chat_server_answers_with_the_imported_head_model(upstream_data, store):
    from nanochat_core.serve.server import create_app

    root = upstream_data / "head"
    result = import_upstream(root / "checkpoint", store, tokenizer_dir=root / "tokenizer", say=lambda _: None)
    model, tokenizer = nanochat_core.load_model(result.model.uri)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected, finish = greedy_reply(model, tokenizer, messages, max_tokens=12)
    with running(create_app(model, tokenizer)) as url:
        body = {"messages": messages, "temperature": 0, "max_tokens": 12}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    assert reply["choices"][0]["message"]["content"] == expected
    assert reply["choices"][0]["finish_reason"] == finish


def test_reimport_finds_the_artifact_and_a_damaged_one_is_written_anew(upstream_data, tmp_path):
    root = upstream_data / "seed"
    first = import_upstream(root / "checkpoint", str(tmp_path), say=lambda _: None)  # tokenizer: the sibling dir
    again = import_upstream(root / "checkpoint", str(tmp_path), say=lambda _: None)
    assert again == first
    weights = Path(first.model.uri) / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.pt is corrupt"):
        nanochat_core.load_model(first.model.uri)
    repaired = import_upstream(root / "checkpoint", str(tmp_path), say=lambda _: None)
    assert repaired == first  # same bytes, same manifest
    artifacts.verify_artifact(repaired.model.uri, repaired.model.digest, deep=True)
    assert sorted(p.name for p in (tmp_path / MODEL_STAGE).iterdir()) == [first.model.uri.split("/")[-1]]


def test_load_model_takes_training_checkpoints_and_refuses_what_is_not_a_model(tmp_path, upstream_data, store):
    """A checkpoint of a stage still training on the imported model (SFT, say) loads with the tokenizer its stage
    recorded; a directory that is no model of a store is refused."""
    from nanochat_core.checkpoint import save_checkpoint
    from nanochat_core.common import DistInfo

    root = upstream_data / "seed"
    result = import_upstream(root / "checkpoint", store, tokenizer_dir=root / "tokenizer", say=lambda _: None)
    model, _ = nanochat_core.load_model(result.model.uri)
    work = Path(store) / "sft" / "0123456789abcdef0123"
    work.mkdir(parents=True)
    recorded = {"tokenizer": {"uri": f"{TOKENIZER_STAGE}/{result.tokenizer.uri.split('/')[-1]}",
                              "digest": result.tokenizer.digest}}
    (work / artifacts.INPUTS).write_text(json.dumps(recorded))
    ckpt = save_checkpoint(work, 5, model, [], {"stage": "sft", "model_config": model.config.to_dict()},
                           DistInfo(0, 0, 1, torch.device("cpu")), None)
    again, tokenizer = nanochat_core.load_model(str(ckpt))
    assert tokenizer.get_vocab_size() == 1024
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))

    with pytest.raises(ArtifactError, match="does not exist"):
        nanochat_core.load_model(tmp_path / "nothing")
    bare = tmp_path / "bare"
    shutil.copytree(result.model.uri, bare)
    (bare / artifacts.MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="cannot tell which tokenizer"):
        nanochat_core.load_model(bare)


def test_import_nanochat_core_stays_light():
    code = ("import sys, nanochat_core\n"
            "print(sorted(m for m in ('torch', 'nanochat_core.pipeline') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# upstream's layout, GPU checkpoints, formats


def link_checkpoint(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for p in src.iterdir():
        (dest / p.name).symlink_to(p)
    return dest


def test_upstream_layout_default_tokenizer_and_phase(upstream_data, tmp_path):
    base = tmp_path / "nanochat"
    ckpt = link_checkpoint(upstream_data / "head" / "checkpoint", base / "chatsft_checkpoints" / "d4")
    link_checkpoint(upstream_data / "head" / "tokenizer", base / "tokenizer")
    result = import_upstream(ckpt, str(tmp_path / "store"), say=lambda _: None)
    assert result.phase == "sft" and result.format == JUL2026


def test_gpu_checkpoint_bf16_and_compile_prefix(upstream_data, tmp_path):
    """What upstream saves on a GPU: wte and value embeddings in bf16, keys of a compiled model: loaded as fp32."""
    src = upstream_data / "head" / "checkpoint"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(src / "meta_000000.json", ckpt)
    state = torch.load(src / "model_000000.pt", weights_only=True)
    gpu = {f"_orig_mod.{k}": v.bfloat16() if k.startswith(("transformer.wte", "value_embeds")) else v
           for k, v in state.items()}
    torch.save(gpu, ckpt / "model_000000.pt")
    loaded = read_upstream_model(ckpt)
    assert set(loaded.state) == set(state)
    assert all(v.dtype == torch.float32 for v in loaded.state.values())
    assert torch.equal(loaded.state["value_embeds.1.weight"], state["value_embeds.1.weight"].bfloat16().float())
    assert torch.equal(loaded.state["lm_head.weight"], state["lm_head.weight"])


def edited_checkpoint(upstream_data: Path, tmp_path: Path, name: str, edit_state=None, edit_meta=None) -> Path:
    src = upstream_data / name / "checkpoint"
    ckpt = tmp_path / f"{name}-edited"
    ckpt.mkdir()
    state = torch.load(src / "model_000000.pt", weights_only=True)
    meta = json.loads((src / "meta_000000.json").read_text())
    if edit_state:
        edit_state(state)
    if edit_meta:
        edit_meta(meta)
    torch.save(state, ckpt / "model_000000.pt")
    (ckpt / "meta_000000.json").write_text(json.dumps(meta))
    return ckpt


@pytest.mark.parametrize("case, edit_state, edit_meta, message", [
    ("extra key", lambda s: s.update({"transformer.h.0.attn.bias": torch.zeros(4)}), None,
     r"unexpected transformer\.h\.0\.attn\.bias"),
    ("missing key", lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"), None,
     r"missing transformer\.h\.1\.mlp\.c_fc\.weight"),
    ("shape", lambda s: s.update({"lm_head.weight": torch.zeros(1000, 128)}), None,
     r"lm_head\.weight has shape \[1000, 128\], the model_config gives \[1024, 128\]"),
    ("between formats", lambda s: s.update({"resid_lambdas": torch.ones(2)}), None,
     r"format this import does not know.*has resid_lambdas but lacks x0_lambdas"),
    ("config field", None, lambda m: m["model_config"].update({"mlp_ratio": 4}), r"unknown field\(s\) mlp_ratio"),
    ("config value", None, lambda m: m["model_config"].update({"n_head": 0}), r"model_config\.n_head must be"),
    ("not a tensor", lambda s: s.update({"step": 3}), None, r"entry 'step' is a int, not a tensor"),
])
def test_bad_checkpoints_are_refused_naming_the_key(upstream_data, tmp_path, case, edit_state, edit_meta, message):
    ckpt = edited_checkpoint(upstream_data, tmp_path, "seed", edit_state, edit_meta)
    with pytest.raises(UpstreamError, match=message):
        read_upstream_model(ckpt)


# ---------------------------------------------------------------------------------------------
# 3. tokenizer.pkl: only an Encoding's plain state


def encoding_pickle(state) -> bytes:
    """A pickle made the way tokenizer.pkl was (protocol 4: the Encoding class, NEWOBJ, `state`, BUILD), with any
    `state`."""
    target = tiktoken.core.Encoding.__new__(tiktoken.core.Encoding)

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if obj is target:
                return copyreg.__newobj__, (tiktoken.core.Encoding,), state
            return NotImplemented

    buf = io.BytesIO()
    Pickler(buf, protocol=4).dump(target)
    return buf.getvalue()


@pytest.fixture(scope="module")
def real_state(upstream_data) -> dict:
    with open(upstream_data / "seed" / "tokenizer" / "tokenizer.pkl", "rb") as f:
        return pickle.load(f).__getstate__()  # noqa: S301 - the trusted test copy


class RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def hostile_cases(real_state: dict, marker: Path) -> dict[str, tuple[bytes, str]]:
    real = encoding_pickle(real_state)
    return {
        "os.system via REDUCE": (pickle.dumps(RunsCommand(f"touch {marker}"), protocol=4),
                                 r"refers to posix\.system|refers to os\.system"),
        "os.system inside the state": (encoding_pickle({**real_state, "name": RunsCommand(f"touch {marker}")}),
                                       r"refers to posix\.system|refers to os\.system"),
        "another global": (pickle.dumps(collections_ordered_dict(), protocol=4), r"refers to collections\.OrderedDict"),
        "an extra global in the Encoding's state": (encoding_pickle({**real_state, "name": print}),
                                                    r"refers to builtins\.print"),
        "Encoding called (REDUCE)": (pickle.dumps(CallsEncoding(real_state), protocol=4), r"opcode REDUCE"),
        "an extra opcode (a list)": (encoding_pickle({**real_state, "name": ["rustbpe"]}), r"opcode EMPTY_LIST"),
        "truncated": (real[: len(real) // 2], r"truncated or damaged"),
        "a registry name for state": (encoding_pickle("gpt2"), r"state is a str \('gpt2'"),
        "two objects": (real[:-1] + real[2:], r"not a complete pickle|structure|opcode"),
        "not a pickle": (b"base64 rank\n" * 10, r"does not start as a pickle"),
    }


def collections_ordered_dict():
    from collections import OrderedDict

    return OrderedDict(a=1)


class CallsEncoding:
    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return tiktoken.core.Encoding, (), self.state


def test_the_pickles_below_are_made_like_upstreams(real_state, upstream_data, tmp_path):
    """encoding_pickle of the real state gives tokenizer.pkl byte for byte, so the cases below differ from a real
    file only where they say."""
    data = encoding_pickle(real_state)
    assert data == (upstream_data / "seed" / "tokenizer" / "tokenizer.pkl").read_bytes()
    (tmp_path / "tokenizer.pkl").write_bytes(data)
    assert read_tokenizer_pkl(tmp_path).get_vocab_size() == 1024


def test_hostile_pickles_are_refused_and_nothing_runs(real_state, tmp_path):
    marker = tmp_path / "pwned"
    for case, (data, message) in hostile_cases(real_state, marker).items():
        path = tmp_path / f"{case.replace(' ', '_')}.pkl"
        path.write_bytes(data)
        with pytest.raises(TokenizerError, match=message) as info:
            read_tokenizer_pkl(path)
        assert str(path) in str(info.value), case
        assert not marker.exists(), f"{case}: the pickle ran a command"


def test_the_unpickler_alone_admits_only_the_encoding(real_state, tmp_path):
    """Behind the opcode scan: the unpickler's one global is a stand-in that keeps its state and cannot be called."""
    marker = tmp_path / "pwned"
    for data, message in [(pickle.dumps(RunsCommand(f"touch {marker}"), protocol=4), "refers to posix.system"),
                          (pickle.dumps(CallsEncoding(real_state), protocol=4), "calls tiktoken.core.Encoding"),
                          (pickle.dumps(collections_ordered_dict(), protocol=4), "collections.OrderedDict")]:
        with pytest.raises(pickle.UnpicklingError, match=message.replace(".", r"\.")):
            EncodingUnpickler(io.BytesIO(data)).load()
    assert not marker.exists()
    kept = EncodingUnpickler(io.BytesIO(encoding_pickle(real_state))).load()
    assert not isinstance(kept, tiktoken.core.Encoding) and kept.state == real_state


def test_malformed_encoding_states_are_refused(real_state, tmp_path):
    ranks = real_state["mergeable_ranks"]
    n = len(ranks)
    wrong_specials = dict(real_state["special_tokens"])
    wrong_specials["<|user_start|>"], wrong_specials["<|user_end|>"] = n + 2, n + 1
    cases = {
        "unknown field": ({**real_state, "eval": "x"}, r"unknown field\(s\) eval"),
        "missing field": ({k: v for k, v in real_state.items() if k != "pat_str"}, r"lacks pat_str"),
        "str ranks": ({**real_state, "mergeable_ranks": {"a": 0}}, r"maps str to int"),
        "gap in ranks": ({**real_state, "mergeable_ranks": {**ranks, b"zzzz": n + 5}}, r"not the ranks 0\.\."),
        "no byte tokens": ({**real_state, "mergeable_ranks": {k: v - 256 for k, v in ranks.items() if v >= 256}},
                           r"lacks 256 single-byte"),
        "special order": ({**real_state, "special_tokens": wrong_specials}, r"special_tokens .* differ"),
        "pattern type": ({**real_state, "pat_str": b"x"}, r"pat_str is a bytes"),
    }
    for case, (state, message) in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.pkl"
        path.write_bytes(encoding_pickle(state))
        with pytest.raises(TokenizerError, match=message):
            read_tokenizer_pkl(path)


# ---------------------------------------------------------------------------------------------
# 4. the command line


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_cli_import_prints_the_uri_last(upstream_data, tmp_path, capsys):
    root = upstream_data / "head"
    code, out, _ = run_cli(["import", "--upstream", str(root / "checkpoint"), "--tokenizer", str(root / "tokenizer"),
                            "--step", "0", "--store", str(tmp_path / "store")], capsys)
    uri = out.strip().splitlines()[-1]
    assert code == 0 and uri.startswith(str(tmp_path / "store" / MODEL_STAGE))
    model, _ = nanochat_core.load_model(uri)
    assert model.config.smear and model.config.window_pattern == "SSSL"


def test_cli_bad_inputs_are_one_line_errors_naming_the_path(upstream_data, tmp_path, capsys, real_state):
    root = upstream_data / "seed"
    empty = tmp_path / "empty"
    empty.mkdir()
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "tokenizer.pkl").write_bytes(pickle.dumps(RunsCommand(f"touch {tmp_path / 'pwned'}"), protocol=4))
    store = tmp_path / "store"
    cases = [
        (["--upstream", str(tmp_path / "missing")], str(tmp_path / "missing"), "does not exist"),
        (["--upstream", str(empty)], str(empty), "no model_<step>.pt"),
        (["--upstream", str(root / "checkpoint"), "--step", "7"], str(root / "checkpoint"), "no checkpoint for step 7"),
        (["--upstream", str(root / "checkpoint"), "--tokenizer", str(tmp_path / "tok")], str(tmp_path / "tok"),
         "does not exist"),
        (["--upstream", str(root / "checkpoint"), "--tokenizer", str(empty)], str(empty / "tokenizer.pkl"), "missing"),
        (["--upstream", str(root / "checkpoint"), "--tokenizer", str(hostile)], str(hostile / "tokenizer.pkl"),
         "refused"),
    ]
    for args, path, words in cases:
        code, out, err = run_cli(["import", *args, "--store", str(store)], capsys)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nanochat: error: "), err
        assert path in lines[0] and words in lines[0], lines[0]
    assert not (tmp_path / "pwned").exists()
    assert not store.exists() or not any(store.rglob(artifacts.MANIFEST))  # nothing was written


def test_import_into_s3_and_load_from_there(upstream_data, moto, tmp_path):  # noqa: F811 - the fixture
    """An s3:// store through the store's own code (moto_server): published manifest-last, then loaded from S3
    on a machine without the staged copy."""
    root = upstream_data / "head"
    store = f"s3://{BUCKET}/imports"
    result = import_upstream(root / "checkpoint", store, tokenizer_dir=root / "tokenizer", say=lambda _: None)
    assert result.model.uri.startswith(f"{store}/{MODEL_STAGE}/")
    shutil.rmtree(moto["local"] / "staging")  # another machine: only the store has it
    model, _ = nanochat_core.load_model(result.model.uri)
    ref = torch.load(root / "reference.pt", weights_only=True)
    with torch.no_grad():
        assert (model(ref["input_ids"]) - ref["logits"]).abs().max() <= 1e-4
    assert import_upstream(root / "checkpoint", store, tokenizer_dir=root / "tokenizer", say=lambda _: None) == result


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETS))
def test_sft_stage_fine_tunes_the_imported_model(upstream_data, tmp_path, name):
    """The stage contract with an imported model as SFT's input: a few steps, a chat model that loads."""
    root = upstream_data / name
    store = str(tmp_path / "store")
    result = import_upstream(root / "checkpoint", store, tokenizer_dir=root / "tokenizer", say=lambda _: None)
    config = {"num_iterations": 2, "max_seq_len": 64, "device_batch_size": 4, "examples_per_step": 4,
              "eval_every": 2, "eval_steps": 1, "max_examples": 40}
    sft = stages.run_stage("sft", stages.make_config("sft", config),
                           {"mid": result.model, "tokenizer": result.tokenizer}, store)
    model, tokenizer = nanochat_core.load_model(sft.uri)
    imported, _ = nanochat_core.load_model(result.model.uri)
    assert model.config == imported.config and tokenizer.get_vocab_size() == 1024


@pytest.mark.slow
def test_eval_stage_evaluates_the_imported_model_by_its_phase(upstream_data, tmp_path):
    """The eval stage (what `nanochat evaluate` runs) on an imported base model: tasks=auto picks CORE."""
    root = upstream_data / "head"
    store = str(tmp_path / "store")
    result = import_upstream(root / "checkpoint", store, tokenizer_dir=root / "tokenizer", say=lambda _: None)
    ref = stages.run_stage("eval", stages.make_config("eval", {"tasks": "auto", "max_per_task": 2}),
                           {"model": result.model, "tokenizer": result.tokenizer}, store)
    metrics = artifacts.read_manifest(ref.uri)["metrics"]
    assert metrics["phase"] == "base" and metrics["step"] == 0 and "CORE" in metrics
