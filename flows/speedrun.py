"""The speedrun flow: every stage of the pipeline in order for a preset, then the chat server.

shards -> tokenizer -> base (torchrun) -> mid (torchrun) -> sft (torchrun) -> eval -> serve

Each stage is a cached task (see flows/tasks.py), so running the flow again skips finished stages, a
crashed training stage resumes from its newest checkpoint, and changing one stage's config re-runs
that stage and the ones after it only. Every run writes `<store>/runs/<run id>/summary.json`
({"stages": {name: {uri, digest, cached, seconds}}, "server": {url, pid}}) and `report.md`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from flows.serve import start_server_task
from flows.tasks import run_stage
from nanochat_core import artifacts, report, stages
from nanochat_core.config import ConfigError, config_to_dict
from nanochat_core.data.sources import DATA_ENV, data_root
from nanochat_core.presets import build_configs, preset_values


def resolve_data(data: str | None) -> str:
    """The data mirror for this run (explicit, else $NANOCHAT_DATA, else "" = Hugging Face), checked."""
    if data:
        os.environ[DATA_ENV] = data
    return data_root() or ""  # raises DataError with the path when the directory is missing


def stage_configs(preset: str, overrides: dict[str, dict[str, Any]] | None, data: str) -> dict[str, dict[str, Any]]:
    values = preset_values(preset, overrides)
    values.setdefault("shards", {}).setdefault("source", data)  # the source is part of the shards' identity
    return {stage: config_to_dict(cfg) for stage, cfg in build_configs(preset, values).items()}


def write_run_files(run_dir: str, summary: dict[str, Any], report_md: str) -> None:
    if artifacts.is_remote(run_dir):
        fs = artifacts.filesystem(run_dir)
        fs.pipe(artifacts.join_uri(run_dir, "report.md"), report_md.encode())
        fs.pipe(artifacts.join_uri(run_dir, "summary.json"), json.dumps(summary, indent=2).encode())
        return
    path = artifacts.local_path(run_dir)
    artifacts.atomic_write_bytes(path / "report.md", report_md.encode())
    artifacts.atomic_write_bytes(path / "summary.json", json.dumps(summary, indent=2).encode())


def report_input(run_id: str, started: str, summary: dict[str, Any], configs: dict[str, Any]) -> dict[str, Any]:
    """The dict nanochat_core.report.render_report expects, from the stage manifests."""
    stage_info, evals = {}, {}
    for name, info in summary["stages"].items():
        manifest = artifacts.read_manifest(info["uri"])
        stage_info[name] = {"metrics": manifest["metrics"], "config": configs[name],
                            "seconds": info["seconds"], "cached": info["cached"]}
    if "eval" in stage_info:
        evals["sft"] = stage_info["eval"]["metrics"]
    return {"run_id": run_id, "started": started, "stages": stage_info, "evals": evals}


@flow(name="speedrun", log_prints=True)
def speedrun(
    preset: str = "tiny",
    store: str = "./store",
    port: int = 8000,
    host: str = "127.0.0.1",
    data: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    nproc: int = 1,
    serve: bool = True,
) -> dict[str, Any]:
    """Run the whole pipeline for `preset` into `store`; returns the run summary."""
    logger = get_run_logger()
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}")
    if not artifacts.is_remote(store):
        store = str(Path(store).expanduser().resolve())
    artifacts.check_store(store)
    configs = stage_configs(preset, overrides, resolve_data(data))
    run_id = str(runtime.flow_run.id or uuid.uuid4())
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run_dir = artifacts.join_uri(store, "runs", run_id)
    logger.info(f"speedrun {preset}: store {store}, run {run_id}")

    refs: dict[str, artifacts.ArtifactRef] = {}
    summary: dict[str, Any] = {"run_id": run_id, "preset": preset, "started": started, "stages": {}, "server": None}
    t_start = time.time()
    for stage in stages.PIPELINE:
        inputs = {flag: refs[upstream] for flag, upstream in stages.STAGES[stage].inputs}
        ref, cached, seconds = run_stage(stage, configs[stage], inputs, store, nproc=nproc)
        refs[stage] = ref
        summary["stages"][stage] = {"uri": ref.uri, "digest": ref.digest, "cached": cached,
                                    "seconds": round(seconds, 2)}
        logger.info(f"{stage}: {'Cached' if cached else 'done'} in {seconds:.1f}s -> {ref.uri}")
    summary["wall_seconds"] = round(time.time() - t_start, 2)

    card = report.render_report(report_input(run_id, started, summary, configs))
    create_markdown_artifact(markdown=card, key="report-card", description=f"nanochat {preset} report card")
    if serve:
        state_dir = artifacts.local_path(store) / "runs" if not artifacts.is_remote(store) else (
            Path.home() / ".cache" / "nanochat" / "servers")
        info = start_server_task(refs["sft"].to_dict(), host, port, str(state_dir))
        summary["server"] = {"url": info["url"], "pid": info["pid"]}
    write_run_files(run_dir, summary, card)
    logger.info(f"summary: {artifacts.join_uri(run_dir, 'summary.json')}")
    return summary
