"""Stage identity: which code is part of each stage's key (pinned here), normalized-source hashing, and the
fence that keeps the pipeline and serving packages out of the ML core."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat_core.pipeline import identity, stages
from nanochat_core.pipeline.identity import LayerError

REPO = Path(__file__).resolve().parents[1]

# The modules that compute each stage's artifact. A change to any of them re-runs the stage; a change anywhere
# else (store, S3, logging, report, server, UI, flows, CLI) re-runs nothing. Change this list only on purpose.
LEAVES = ["nanochat_core.config", "nanochat_core.errors", "nanochat_core.fileio"]
MODEL = ["nanochat_core.adamw", "nanochat_core.checkpoint", "nanochat_core.common", "nanochat_core.gpt",
         "nanochat_core.muon", "nanochat_core.tokenizer", "nanochat_core.data.sources"]
TRAIN = [*LEAVES, *MODEL, "nanochat_core.device", "nanochat_core.train.common"]
ENGINE = ["nanochat_core.calculator", "nanochat_core.chat_eval", "nanochat_core.engine", "nanochat_core.sandbox",
          "nanochat_core.tasks"]
CLOSURES = {
    "shards": ["nanochat_core.config", "nanochat_core.data.shards", "nanochat_core.data.sources",
               "nanochat_core.errors"],
    "tokenizer": [*LEAVES, "nanochat_core.data.sources", "nanochat_core.tok_eval", "nanochat_core.tok_train",
                  "nanochat_core.tokenizer", "rustbpe"],
    "base": [*TRAIN, "nanochat_core.dataloader", "nanochat_core.fp8", "nanochat_core.loss_eval",
             "nanochat_core.train.base"],
    "mid": [*TRAIN, "nanochat_core.dataloader", "nanochat_core.loss_eval", "nanochat_core.tasks",
            "nanochat_core.train.mid"],
    "sft": [*TRAIN, "nanochat_core.loss_eval", "nanochat_core.tasks", "nanochat_core.train.sft"],
    "rl": [*TRAIN, *ENGINE, "nanochat_core.train.rl"],
    "eval": [*LEAVES, *MODEL, *ENGINE, "nanochat_core.core_eval", "nanochat_core.eval"],
}


@pytest.mark.parametrize("stage", list(CLOSURES))
def test_stage_closure_is_pinned(stage):
    entry = stages.STAGES[stage].module
    found = identity.closure(entry)
    expected = set(CLOSURES[stage])
    extra = [f"{m} (imported by {' -> '.join(identity.import_chain(entry, m, found))})"
             for m in sorted(set(found) - expected)]
    missing = sorted(expected - set(found))
    assert not extra and not missing, (
        f"the {stage} stage's identity changed: now also {extra or 'nothing'}; no longer {missing or 'nothing'}. "
        f"If that module computes the artifact, add it to CLOSURES; if not (storage, logging, reporting, serving), "
        f"remove the import that dragged it in.")


def test_no_core_module_reaches_the_pipeline_or_serving_packages():
    root = REPO / "nanochat_core"
    core = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in root.rglob("*.py")
            if p.relative_to(root).parts[0] not in ("pipeline", "serve")]
    for module in core:
        identity.closure(module.removesuffix(".__init__"))  # raises LayerError naming the import


def test_nothing_in_nanochat_core_imports_prefect_or_flows():
    code = ("import sys, pkgutil, importlib, nanochat_core\n"
            "for m in pkgutil.walk_packages(nanochat_core.__path__, 'nanochat_core.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'flows'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def tree(tmp_path):
    """A copy of nanochat_core and rustbpe/src to edit."""
    shutil.copytree(REPO / "nanochat_core", tmp_path / "nanochat_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "rustbpe" / "src", tmp_path / "rustbpe" / "src")
    return tmp_path


def hashes(tree: Path, stage: str) -> dict[str, str]:
    return identity.module_hashes(stages.STAGES[stage].module, tree / "nanochat_core", tree / "rustbpe" / "src")


def test_a_store_import_in_a_training_module_is_refused_by_name(tree):
    base = tree / "nanochat_core" / "train" / "base.py"
    base.write_text(base.read_text() + "\nfrom nanochat_core.pipeline.artifacts import publish  # noqa\n")
    with pytest.raises(LayerError, match=r"nanochat_core\.train\.base imports nanochat_core\.pipeline\.artifacts"):
        hashes(tree, "base")


def test_an_import_that_drags_in_new_code_fails_the_pin_naming_it(tree):
    common = tree / "nanochat_core" / "train" / "common.py"
    common.write_text(common.read_text() + "\nfrom nanochat_core import tok_eval  # noqa\n")
    found = identity.closure("nanochat_core.train.base", tree / "nanochat_core")
    assert "nanochat_core.tok_eval" in set(found) - set(CLOSURES["base"])
    assert identity.import_chain("nanochat_core.train.base", "nanochat_core.tok_eval", found) == [
        "nanochat_core.train.base", "nanochat_core.train.common", "nanochat_core.tok_eval"]


def test_comments_docstrings_and_formatting_change_no_hash(tree):
    before = {stage: hashes(tree, stage) for stage in CLOSURES}
    for path in (tree / "nanochat_core").rglob("*.py"):
        text = path.read_text()
        if text.startswith('"""'):
            text = text.replace('"""', '"""An edited docstring. ', 1)
        else:
            text = '"""An added docstring."""\n' + text
        path.write_text("# an added comment\n" + text.replace("\n\n\n", "\n\n\n\n") + "\n# trailing comment\n")
    gpt = tree / "nanochat_core" / "gpt.py"
    text = gpt.read_text()
    gpt.write_text(text.replace("def forward(self", "def forward(  self", 1).replace(
        "class GPT(nn.Module):\n", "class GPT(nn.Module):\n    \"\"\"A docstring for the model class.\"\"\"\n", 1))
    for path in (tree / "rustbpe" / "src").glob("*.rs"):
        path.write_text("// a comment\n/* a block\n comment */\n" + path.read_text().replace("\n", "\n\n"))
    assert {stage: hashes(tree, stage) for stage in CLOSURES} == before


def test_a_working_change_changes_exactly_the_stages_that_run_that_code(tree):
    before = {stage: identity.code_version(hashes(tree, stage)) for stage in CLOSURES}
    gpt = tree / "nanochat_core" / "gpt.py"
    gpt.write_text(gpt.read_text() + "\nEXTRA_CONSTANT = 1\n")
    after = {stage: identity.code_version(hashes(tree, stage)) for stage in CLOSURES}
    assert {s for s in CLOSURES if before[s] != after[s]} == {"base", "mid", "sft", "rl", "eval"}
    assert identity.changed_modules(hashes(REPO, "base"), hashes(tree, "base")) == ["nanochat_core.gpt"]


def test_rust_source_hash_ignores_comments_not_strings():
    code = 'fn f() -> &str { "a // not a comment" } // a comment\n'
    assert identity.rust_source_hash(code) == identity.rust_source_hash('fn f() -> &str {  "a // not a comment" }')
    assert identity.rust_source_hash(code) != identity.rust_source_hash('fn f() -> &str { "a // other" }')


def test_cache_key_depends_on_every_part():
    base = identity.cache_key("s", {"a": 1}, {"up": "d1"}, "c1")
    assert base == identity.cache_key("s", {"a": 1}, {"up": "d1"}, "c1")
    assert base != identity.cache_key("t", {"a": 1}, {"up": "d1"}, "c1")
    assert base != identity.cache_key("s", {"a": 2}, {"up": "d1"}, "c1")
    assert base != identity.cache_key("s", {"a": 1}, {"up": "d2"}, "c1")
    assert base != identity.cache_key("s", {"a": 1}, {"up": "d1"}, "c2")
