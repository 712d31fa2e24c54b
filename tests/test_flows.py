"""The speedrun flow against a real Prefect server: end to end, caching, partial re-runs, damaged
artifacts, kill-and-resume during pretraining, and bad input.

One store is shared by the tests of this module (in order), so finished stages are reused the way a
user's store would be; each test says what it expects to be Cached.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from nanochat_core.pipeline import artifacts, plan
from nanochat_core.pipeline.presets import stage_configs

REPO = Path(__file__).resolve().parents[1]

# Small enough to run every stage in seconds on 2 cores; the real tiny preset is exercised by `make speedrun`.
MICRO = {
    "tokenizer": {"vocab_size": 512, "max_chars": 2_000_000},
    "base": {"depth": 2, "max_seq_len": 64, "device_batch_size": 8, "total_batch_size": 512,
             "num_iterations": 30, "eval_every": 15, "eval_tokens": 4096, "save_every": 10},
    "mid": {"num_iterations": 8, "max_seq_len": 64, "device_batch_size": 8, "total_batch_size": 512,
            "eval_every": 4, "eval_steps": 2, "save_every": 4, "max_examples": 400},
    "sft": {"num_iterations": 6, "max_seq_len": 64, "device_batch_size": 4, "examples_per_step": 8,
            "eval_every": 3, "eval_steps": 2, "save_every": 3, "max_examples": 200},
    "rl": {"num_iterations": 2, "max_examples": 2, "examples_per_step": 2, "num_samples": 2, "device_batch_size": 2,
           "max_new_tokens": 8, "max_eval": 2, "eval_samples": 2, "save_every": 1},
    "eval": {"max_per_task": 2, "max_new_tokens": 16},
}
STAGES = ["shards", "tokenizer", "base", "base_eval", "mid", "mid_eval", "sft", "sft_eval"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_overrides(**changes):
    out = json.loads(json.dumps(MICRO))
    for stage, fields in changes.items():
        out.setdefault(stage, {}).update(fields)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server_pids(store):
    """Chat servers the flows start outlive them by design; stop every one this module's store recorded."""
    pids = []
    yield pids
    recorded = [json.loads(p.read_text())["pid"] for p in Path(store).glob("runs/server-*.json")]
    for pid in set(pids) | set(recorded):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def run_flow(store, **kwargs):
    from flows.speedrun import speedrun

    return speedrun(preset="tiny", store=str(store), **kwargs)


def cached(summary):
    return {name: info["cached"] for name, info in summary["stages"].items()}


def prefect_artifacts(keys: list[str]) -> dict[str, str]:
    """{key: type} of the artifacts with these keys on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    return {a.key: a.type for a in found}


def chat(url: str, text: str) -> str:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0.0}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == {"done": True}
    return "".join(e.get("token", "") for e in events[:-1])


def test_speedrun_end_to_end_then_all_cached(prefect_api, store, server_pids):
    port = free_port()
    first = run_flow(store, overrides=MICRO, port=port)
    server_pids.append(first["server"]["pid"])
    assert list(first["stages"]) == STAGES
    assert not any(cached(first).values())
    summary_path = Path(store) / "runs" / first["run_id"] / "summary.json"
    on_disk = json.loads(summary_path.read_text())
    assert set(on_disk["stages"]["base"]) == {"uri", "digest", "cached", "reused", "reasons", "seconds"}
    assert on_disk["stages"]["base"]["reasons"] == ["no base artifact of this kind in the store yet"]
    assert on_disk["server"]["url"] == f"http://127.0.0.1:{port}"
    run_dir = Path(store) / "runs" / first["run_id"]
    card = (run_dir / "report.md").read_text()
    assert card.startswith("# nanochat training report")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in card.split("## Summary")[1].splitlines() if line.startswith("| ")}
    # every row with data shows it; RL did not run, so its column is all "-"
    assert rows["CORE"][0] != "-" and rows["CORE"][1:] == ["-", "-", "-"]
    for task in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE", "SpellingBee"):
        assert rows[task][0] == "-" and "-" not in rows[task][1:3] and rows[task][3] == "-", (task, rows[task])
    assert rows["Wall time"][3] == "-" and "-" not in rows["Wall time"][:3]
    for phase in ("base", "mid", "sft"):
        assert f"![{phase} training loss]({phase}_loss.png)" in card
        assert (run_dir / f"{phase}_loss.png").read_bytes()[:4] == b"\x89PNG"
    published = prefect_artifacts(["report-card", "report-summary", "base-loss-curve", "mid-loss-curve",
                                   "sft-loss-curve"])
    assert published == {"report-card": "markdown", "report-summary": "table", "base-loss-curve": "image",
                         "mid-loss-curve": "image", "sft-loss-curve": "image"}
    assert httpx.get(f"{first['server']['url']}/health", timeout=10).status_code == 200
    assert isinstance(chat(first["server"]["url"], "Hello!"), str)

    base_metrics = json.loads((Path(first["stages"]["base"]["uri"]) / "MANIFEST.json").read_text())["metrics"]
    assert base_metrics["val_bpb"] < base_metrics["unigram_bpb"]

    t0 = time.time()
    second = run_flow(store, overrides=MICRO, port=port)
    assert all(cached(second).values()), cached(second)
    assert second["server"]["url"] == first["server"]["url"]
    assert httpx.get(f"{second['server']['url']}/health", timeout=10).status_code == 200
    assert time.time() - t0 < 60
    assert {s: i["digest"] for s, i in second["stages"].items()} == {s: i["digest"] for s, i in first["stages"].items()}


def test_changing_one_sft_parameter_reruns_sft_and_later_only(prefect_api, store):
    """With the optional RL stage on, too: it runs after SFT and fills the report card's RL column."""
    summary = run_flow(store, overrides=with_overrides(sft={"num_iterations": 4}), serve=False, rl=True)
    assert cached(summary) == {"shards": True, "tokenizer": True, "base": True, "base_eval": True, "mid": True,
                               "mid_eval": True, "sft": False, "sft_eval": False, "rl": False, "rl_eval": False}
    card = (Path(store) / "runs" / summary["run_id"] / "report.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in card.split("## Summary")[1].splitlines() if line.startswith("| ")}
    assert rows["GSM8K"][3] != "-" and rows["CORE"][3] == "-" and rows["Wall time"][3] != "-"
    assert "## Chat RL" in card and "![rl training loss](rl_loss.png)" in card


@pytest.mark.slow  # about 1 min; the default suite checks damaged manifests and a deleted file in a flow below,
# and a flipped byte against the sha256 in test_s3 (deep check) and test_train (checkpoints)
def test_damaged_artifact_is_recomputed_not_served_from_cache(prefect_api, store):
    before = run_flow(store, overrides=MICRO, serve=False)
    assert all(cached(before).values())
    mid_dir = Path(before["stages"]["mid"]["uri"])
    weights = mid_dir / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 check can tell
    weights.write_bytes(bytes(data))
    after = run_flow(store, overrides=MICRO, serve=False)
    assert cached(after) == {"shards": True, "tokenizer": True, "base": True, "base_eval": True, "mid": False,
                             "mid_eval": False, "sft": False, "sft_eval": False}
    assert artifacts.verify_artifact(str(mid_dir), deep=True).digest == after["stages"]["mid"]["digest"]


@pytest.mark.slow  # 1-1.5 min; the default suite kills and resumes training in test_train and test_s3
def test_kill_during_pretraining_then_resume(prefect_api, store, tmp_path):
    overrides = with_overrides(base={"num_iterations": 200, "seed": 7})
    args = [sys.executable, "-m", "flows.cli", "speedrun", "--preset", "tiny", "--store", str(store), "--no-serve"]
    for stage, fields in overrides.items():
        args += [a for k, v in fields.items() for a in ("--set", f"{stage}.{k}={json.dumps(v)}")]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    finished_before = {p.parent for p in Path(store).glob("base/*/MANIFEST.json")}
    log = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 300
    checkpoints = []
    while time.time() < deadline and not checkpoints:
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        checkpoints = [p for p in Path(store).glob("base/*/checkpoints/step_*")
                       if p.parents[1] not in finished_before]
        time.sleep(0.5)
    assert checkpoints, "no base checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)  # the orchestrating process dies outright
    proc.wait()
    time.sleep(3)  # torchrun gets SIGTERM from the kernel (parent death) and stops its workers
    # this test's training processes only (their --out is under this store), not another run's on the machine
    leftover = subprocess.run(["pgrep", "-f", f"nanochat_core.train.base.*{store}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "training processes outlived the killed run"

    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = sorted((Path(store) / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(runs[-1].read_text())
    assert summary["stages"]["shards"]["cached"] and summary["stages"]["tokenizer"]["cached"]
    assert not summary["stages"]["base"]["cached"]
    base = json.loads((Path(summary["stages"]["base"]["uri"]) / "MANIFEST.json").read_text())
    assert base["metrics"]["resumed_from_step"] > 0
    assert base["metrics"]["steps"] == 200


@pytest.mark.parametrize("extra, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--data", "/nonexistent/data"], "/nonexistent/data"),
    (["--set", "sft.num_iterationz=3"], "num_iterationz"),
])
def test_bad_input_gets_a_clear_error(tmp_path, extra, message):
    args = [sys.executable, "-m", "flows.cli", "speedrun", "--store", str(tmp_path / "s"), "--no-serve", *extra]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unwritable_store_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    args = [sys.executable, "-m", "flows.cli", "speedrun", "--store", str(blocker / "store"), "--no-serve"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "not writable" in result.stderr
    assert blocker.read_text() == "not a directory"


def test_chat_command_answers_from_a_stored_model(prefect_api, store):
    sft = sorted(Path(store).glob("sft/*/MANIFEST.json"))
    assert sft, "the end-to-end test leaves a chat model in the store"
    args = [sys.executable, "-m", "flows.cli", "chat", "--checkpoint", str(sft[0].parent), "-p", "Hello"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() != ""
    bad = subprocess.run([*args[:5], str(Path(store) / "nope"), "-p", "x"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "incomplete" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------
# Resume after a code fix (issue 12): what re-runs, what does not, and why. Edits are made to a copy of the
# project and the copy's own `nanochat speedrun` runs on this module's store, so the code that is planned and
# run is the edited one: comments everywhere and working changes outside the core re-run nothing; a model change
# re-runs base and after, naming the module (`--reuse base` keeps base); damaged manifests and a deleted file are
# recomputed alone; an edited identity file re-runs mid and later; a moved store serves and resumes.

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
def rerun_store(store, prefect_api, overrides):
    """This module's store after a run with an identity file (mid and later re-run for it; after the tests above,
    the rest is cached)."""
    summary = run_flow(store, overrides=overrides, serve=False)
    ran = [n for n, s in summary["stages"].items() if not s["cached"]]
    assert {"mid", "mid_eval", "sft", "sft_eval"} <= set(ran), ran
    return Path(store)


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
    # a Prefect API that nothing answers: the dry run must not need one
    out = nanochat(project, store, overrides, "--dry-run", "--json", *args, api="http://127.0.0.1:9/api")
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


def test_comments_and_edits_outside_the_core_rerun_nothing(rerun_store, overrides, prefect_api, tmp_path):
    store = rerun_store
    project = project_copy(tmp_path)
    add_comments_everywhere(project)
    assert all(d.cached for d in planned(store, overrides, project).values())
    working_changes_outside_the_core(project)
    stages = dry_run_json(project, store, overrides)
    assert {n: s["cached"] for n, s in stages.items()} == dict.fromkeys(STAGES, True), stages
    nanochat(project, store, overrides, api=prefect_api)
    summary = newest_summary(store)
    assert {n: s["cached"] for n, s in summary["stages"].items()} == dict.fromkeys(STAGES, True)


def test_a_model_change_reruns_base_and_after_naming_the_module(rerun_store, overrides, tmp_path):
    store = rerun_store
    project = project_copy(tmp_path)
    append(project, "nanochat_core/gpt.py", "\n\nMODEL_EDIT = 1  # a working change in the model module\n")
    stages = dry_run_json(project, store, overrides)
    assert {n: s["cached"] for n, s in stages.items()} == {
        "shards": True, "tokenizer": True, "base": False, "base_eval": False, "mid": False, "mid_eval": False,
        "sft": False, "sft_eval": False}
    for node in STAGES[2:]:
        assert any("nanochat_core.gpt" in r for r in stages[node]["reasons"]), (node, stages[node])
    assert stages["base"]["reasons"] == ["code changed: nanochat_core.gpt"]
    pinned = planned(store, overrides, project, reuse=["base"])
    assert pinned["base"].cached and pinned["base"].reused
    assert [n for n, d in pinned.items() if not d.cached] == ["base_eval", "mid", "mid_eval", "sft", "sft_eval"]


def test_damaged_records_and_a_deleted_file_recompute_only_those_stages(rerun_store, overrides):
    """A MANIFEST.json that is not JSON, one that is JSON but not a manifest, and a tokenizer file deleted: each
    stage is recomputed with a warning naming the file; the same results come back with the same digests, so
    nothing after them re-trains."""
    from flows.speedrun import speedrun

    store = rerun_store

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


def test_editing_the_identity_file_reruns_mid_and_later(rerun_store, overrides, identity_file):
    store = rerun_store
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


def test_a_moved_store_serves_and_resumes_from_its_new_place(rerun_store, overrides, tmp_path):
    from flows.speedrun import speedrun

    store = rerun_store

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
def test_a_model_change_executes_exactly_the_stages_the_dry_run_named(rerun_store, overrides, prefect_api, tmp_path):
    """The real run after the model edit (about 1 min): base and everything after it, shards and tokenizer cached;
    then with --reuse base after a second edit, base is kept and the run says so."""
    store = rerun_store
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
