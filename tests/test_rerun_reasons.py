"""Resume after a code fix: what re-runs, what does not, and why (issue 12).

After a finished run of the speedrun flow (micro configs, a real Prefect test server), edits are made to a copy of
the project and the copy's own `nanochat speedrun` is run on the same store, so the code that is planned and run
is the edited one:
- comments and docstrings in every module, and working changes to store, S3, logging, report, server, UI, flow and
  CLI modules: the dry run shows every stage cached, and the real run executes none;
- a working change in the model: the dry run says base and every stage after it run, naming the module; with
  `--reuse base`, base comes back cached.
And in the store itself: damaged manifests are recomputed with a warning, a deleted tokenizer file recomputes the
tokenizer alone (same digest), an edited identity-conversations file re-runs mid and later, and a moved store
serves and resumes from its new place.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_flows import MICRO
from test_flows import STAGES as NODES

from nanochat_core.pipeline import artifacts, plan
from nanochat_core.pipeline.presets import stage_configs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def identity_file(tmp_path_factory):
    """Who the model is, in upstream's row format (a bare message list), as README suggests users write."""
    path = tmp_path_factory.mktemp("identity") / "identity.jsonl"
    rows = [[{"role": "user", "content": f"Who are you? ({i})"},
             {"role": "assistant", "content": "I am nanochat, a small model trained end to end."}] for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def overrides(identity_file):
    out = json.loads(json.dumps(MICRO))
    out["mid"]["identity_conversations"] = str(identity_file)
    out["sft"]["identity_conversations"] = str(identity_file)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_api, overrides):
    """A store holding one finished micro run."""
    from flows.speedrun import speedrun

    root = tmp_path_factory.mktemp("rerun") / "store"
    first = speedrun(preset="tiny", store=str(root), overrides=overrides, serve=False)
    assert not any(info["cached"] for info in first["stages"].values())
    return root


def set_flags(overrides) -> list[str]:
    return [a for stage, fields in overrides.items() for k, v in fields.items()
            for a in ("--set", f"{stage}.{k}={json.dumps(v)}")]


def project_copy(tmp_path: Path) -> Path:
    """The project's code (core, flows, Rust sources) in a directory of its own, to edit."""
    root = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("nanochat_core", "flows"):
        shutil.copytree(REPO / part, root / part, ignore=ignore)
    shutil.copytree(REPO / "rustbpe" / "src", root / "rustbpe" / "src")
    return root


def nanochat(project: Path, store: Path, overrides, *args: str, api: str | None = None, timeout: int = 600):
    """The copy's `nanochat speedrun` on the store (its code, not the installed one, is imported)."""
    env = {**os.environ, "PYTHONPATH": str(project)}
    if api:
        env["PREFECT_API_URL"] = api
    cmd = [sys.executable, "-m", "flows.cli", "speedrun", "--preset", "tiny", "--store", str(store), "--no-serve",
           *set_flags(overrides), *args]
    result = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def dry_run_json(project, store, overrides, *args) -> dict:
    out = nanochat(project, store, overrides, "--dry-run", "--json", *args)
    return json.loads(out.stdout)["stages"]


def newest_summary(store: Path) -> dict:
    runs = sorted(store.glob("runs/*/summary.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(runs[-1].read_text())


def add_comments_everywhere(project: Path) -> None:
    for path in list(project.rglob("*.py")):
        text = path.read_text()
        text = text.replace('"""', '"""A docstring edit. ', 1) if text.startswith('"""') else '"""Added."""\n' + text
        path.write_text("# a comment added to every module\n" + text + "\n# and one at the end\n")
    for path in (project / "rustbpe" / "src").glob("*.rs"):
        path.write_text("// a comment\n" + path.read_text())


def append(project: Path, rel: str, code: str) -> None:
    path = project / rel
    path.write_text(path.read_text() + code)


def working_changes_outside_the_core(project: Path) -> None:
    """Real (if small) code changes to store, S3 mirroring, logging, report, server, UI, flow and CLI modules."""
    for rel in ("nanochat_core/pipeline/artifacts.py", "nanochat_core/pipeline/remote_checkpoints.py",
                "nanochat_core/progress.py", "nanochat_core/wandb_log.py", "nanochat_core/pipeline/report.py",
                "nanochat_core/serve/server.py", "nanochat_core/serve/batching.py", "flows/speedrun.py",
                "flows/tasks.py", "flows/cli.py"):
        append(project, rel, f"\n\ndef _edited_{Path(rel).stem}() -> int:\n    return 1\n")
    ui = project / "nanochat_core" / "serve" / "ui.html"
    ui.write_text(ui.read_text().replace("</body>", "<!-- edited --></body>"))


def planned(store, overrides, project: Path | None = None, **kwargs) -> dict[str, plan.Decision]:
    """The dry run in this process (for the code of `project` when given): what the CLI's --dry-run prints."""
    configs = stage_configs("tiny", overrides, os.environ["NANOCHAT_DATA"])
    return plan.dry_run(configs, str(store), project=project, **kwargs)


def test_comments_and_edits_outside_the_core_rerun_nothing(store, overrides, prefect_api, tmp_path):
    project = project_copy(tmp_path)
    add_comments_everywhere(project)
    assert all(d.cached for d in planned(store, overrides, project).values())
    working_changes_outside_the_core(project)
    stages = dry_run_json(project, store, overrides)
    assert {n: s["cached"] for n, s in stages.items()} == dict.fromkeys(NODES, True), stages
    nanochat(project, store, overrides, api=prefect_api)
    summary = newest_summary(store)
    assert {n: s["cached"] for n, s in summary["stages"].items()} == dict.fromkeys(NODES, True)


def test_a_model_change_reruns_base_and_after_naming_the_module(store, overrides, tmp_path):
    project = project_copy(tmp_path)
    append(project, "nanochat_core/gpt.py", "\n\nMODEL_EDIT = 1  # a working change in the model module\n")
    stages = dry_run_json(project, store, overrides)
    assert {n: s["cached"] for n, s in stages.items()} == {
        "shards": True, "tokenizer": True, "base": False, "base_eval": False, "mid": False, "mid_eval": False,
        "sft": False, "sft_eval": False}
    for node in NODES[2:]:
        assert any("nanochat_core.gpt" in r for r in stages[node]["reasons"]), (node, stages[node])
    assert stages["base"]["reasons"] == ["code changed: nanochat_core.gpt"]
    pinned = planned(store, overrides, project, reuse=["base"])
    assert pinned["base"].cached and pinned["base"].reused
    assert [n for n, d in pinned.items() if not d.cached] == ["base_eval", "mid", "mid_eval", "sft", "sft_eval"]


def test_damaged_records_and_a_deleted_file_recompute_only_those_stages(store, overrides):
    """A MANIFEST.json that is not JSON, one that is JSON but not a manifest, and a tokenizer file deleted: each
    stage is recomputed with a warning naming the file; the same results come back with the same digests, so
    nothing after them re-trains."""
    from flows.speedrun import speedrun

    before = newest_summary(store)["stages"]
    (Path(before["tokenizer"]["uri"]) / "tokenizer.tiktoken").unlink()
    mid_eval = Path(before["mid_eval"]["uri"]) / "MANIFEST.json"
    mid_eval.write_text(mid_eval.read_text()[:-20] + "} oops")  # not JSON any more
    base_eval = Path(before["base_eval"]["uri"]) / "MANIFEST.json"
    base_eval.write_text("[1, 2, 3]")  # JSON, but not a manifest
    dry = planned(store, overrides)
    assert "tokenizer.tiktoken is missing" in dry["tokenizer"].reasons[0]
    # the dry run cannot know that the tokenizer will come out the same, so it says what depends on it
    assert dry["base"].reasons == ["upstream tokenizer runs first"]
    after = speedrun(preset="tiny", store=str(store), overrides=overrides, serve=False)["stages"]
    assert [n for n, s in after.items() if not s["cached"]] == ["tokenizer", "base_eval", "mid_eval"]
    assert "tokenizer.tiktoken is missing" in after["tokenizer"]["reasons"][0]
    assert "MANIFEST.json is damaged: a JSON list, not a manifest object" in after["base_eval"]["reasons"][0]
    assert "MANIFEST.json is damaged: not valid JSON" in after["mid_eval"]["reasons"][0]
    # mid_eval is left out: its generative tasks sample, so its metrics (and digest) may differ run to run
    same = ["shards", "tokenizer", "base", "base_eval", "mid", "sft", "sft_eval"]
    assert {n: after[n]["digest"] for n in same} == {n: before[n]["digest"] for n in same}


def test_editing_the_identity_file_reruns_mid_and_later(store, overrides, identity_file):
    assert all(d.cached for d in planned(store, overrides).values())
    original = identity_file.read_text()
    try:
        identity_file.write_text(original.replace("nanochat", "nanochat-edited", 1))
        edited = planned(store, overrides)
        assert [n for n, d in edited.items() if not d.cached] == ["mid", "mid_eval", "sft", "sft_eval"]
        assert any("mid.identity_conversations changed: 'sha256:" in r for r in edited["mid"].reasons)
        moved = identity_file.with_name("moved.jsonl")  # the same content elsewhere: nothing re-runs
        identity_file.write_text(original)
        shutil.copy(identity_file, moved)
        elsewhere = json.loads(json.dumps(overrides))
        elsewhere["mid"]["identity_conversations"] = elsewhere["sft"]["identity_conversations"] = str(moved)
        assert all(d.cached for d in planned(store, elsewhere).values())
    finally:
        identity_file.write_text(original)


def test_a_moved_store_serves_and_resumes_from_its_new_place(store, overrides, tmp_path):
    from flows.speedrun import speedrun

    moved = tmp_path / "moved-store"
    shutil.copytree(store, moved)
    shutil.move(str(store), str(store.with_name("away")))  # the original is gone while the copy is used
    try:
        for manifest in moved.glob("*/*/MANIFEST.json"):
            assert str(store) not in manifest.read_text(), manifest
        assert all(d.cached for d in planned(moved, overrides).values())
        summary = speedrun(preset="tiny", store=str(moved), overrides=overrides, serve=False)
        assert all(info["cached"] for info in summary["stages"].values())
        sft = summary["stages"]["sft"]["uri"]
        assert sft.startswith(str(moved))
        chat = subprocess.run([sys.executable, "-m", "flows.cli", "chat", "--checkpoint", sft, "-p", "Hi"],
                              capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0, chat.stderr[-2000:]
        from flows.serve import model_dirs

        _, tok_dir = model_dirs(artifacts.verify_artifact(sft, deep=True))
        assert str(tok_dir).startswith(str(moved))
    finally:
        shutil.move(str(store.with_name("away")), str(store))


@pytest.mark.slow
def test_a_model_change_executes_exactly_the_stages_the_dry_run_named(store, overrides, prefect_api, tmp_path):
    """The real run after the model edit (about 1 min): base and everything after it, shards and tokenizer cached;
    then with --reuse base after a second edit, base is kept and the run says so."""
    project = project_copy(tmp_path)
    append(project, "nanochat_core/gpt.py", "\n\nMODEL_EDIT = 1  # a working change in the model module\n")
    expected = dry_run_json(project, store, overrides)
    nanochat(project, store, overrides, api=prefect_api)
    summary = newest_summary(store)
    assert {n: s["cached"] for n, s in summary["stages"].items()} == {n: s["cached"] for n, s in expected.items()}
    assert summary["stages"]["base"]["reasons"] == expected["base"]["reasons"]
    append(project, "nanochat_core/gpt.py", "\n\nMODEL_EDIT_2 = 2\n")
    nanochat(project, store, overrides, "--reuse", "base", api=prefect_api)
    summary = newest_summary(store)
    assert summary["reused"] == ["base"] and summary["stages"]["base"]["reused"]
    assert not summary["stages"]["mid"]["cached"]
    mid = json.loads((Path(summary["stages"]["mid"]["uri"]) / "MANIFEST.json").read_text())
    assert mid["reused"] == {"base": summary["stages"]["base"]["uri"].split(str(store) + "/")[1]}
    report = (Path(store) / "runs" / summary["run_id"] / "report.md").read_text()
    assert "Reused with --reuse" in report and "base" in report.split("Reused with --reuse")[1]
