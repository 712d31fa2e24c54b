"""The speedrun flow: every stage of the pipeline in order for a preset, then the chat server.

shards -> tokenizer -> base -> base_eval [-> mid -> mid_eval] -> sft -> sft_eval [-> rl -> rl_eval] -> serve
(training stages under torchrun; each *_eval node is the eval stage on that model: CORE for base, the chat
tasks for mid/sft, GSM8K for rl). A preset without midtraining (the 2026 ones) has no mid nodes: sft fine-tunes
the base model (nanochat_core.pipeline.stages.pipeline).

Before the first stage, everything that can be checked is (nanochat_core.pipeline.preflight.check_speedrun:
configs against each other and the world size, files they name, nproc and memory against this machine, the
server's address), so a bad value fails in seconds rather than after base has trained.

Each stage is a cached task (see flows/tasks.py), so running the flow again skips finished stages, a
crashed training stage resumes from its newest checkpoint, and changing one stage's config or code re-runs
that stage and the ones after it only. Before a stage runs, the log says why (nanochat_core.pipeline.plan: the
same reasons `nanochat speedrun --dry-run` gives). `reuse` pins stages to their newest intact artifact.
Every run writes `<store>/runs/<run id>/summary.json` ({"stages": {node: {uri, digest, cached, reused, reasons,
seconds}}, "reused": [...], "server": {url, port, pid}}), `report.md` and the loss-curve PNGs it shows; the report
card, the summary table and the curves are also Prefect artifacts.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from flows.params import Preset, StageOverrides, overrides_dict
from flows.serve import start_server_task
from flows.tasks import run_stage
from nanochat_core.pipeline import artifacts, plan, preflight, report, stages
from nanochat_core.pipeline.launch import Nodes
from nanochat_core.pipeline.presets import resolve_data, stage_configs


def write_run_file(run_dir: str, name: str, data: bytes) -> None:
    if artifacts.is_remote(run_dir):
        artifacts.filesystem(run_dir).pipe(artifacts.join_uri(run_dir, name), data)
    else:
        artifacts.atomic_write_bytes(artifacts.local_path(run_dir) / name, data)


def loss_curves(summary: dict[str, Any]) -> dict[str, bytes]:
    """{training node: PNG of its loss curve}, from the curve each training stage keeps in its meta.json."""
    pngs = {}
    for name in ("base", "mid", "sft", "rl"):
        if name not in summary["stages"]:
            continue
        meta = artifacts.read_artifact_file(summary["stages"][name]["uri"], "meta.json")
        curve = (json.loads(meta).get("loop_state") or {}).get("loss_curve") if meta else None
        if curve:
            pngs[name] = report.loss_curve_png(curve, title=f"{name}: training loss")
    return pngs


def report_input(run_id: str, started: str, summary: dict[str, Any], configs: dict[str, Any],
                 nodes: dict[str, stages.Node]) -> dict[str, Any]:
    """The dict nanochat_core.pipeline.report.render_report expects, from the stage manifests."""
    stage_info = {}
    for name, info in summary["stages"].items():
        manifest = artifacts.read_manifest(info["uri"])
        stage = nodes[name].stage
        stage_info[name] = {"stage": stage, "metrics": manifest["metrics"], "config": configs[stage],
                            "seconds": info["seconds"], "cached": info["cached"], "reused": info.get("reused", False)}
    return {"run_id": run_id, "started": started, "stages": stage_info}


def publish_report(run_dir: str, run: dict[str, Any], summary: dict[str, Any], preset: str) -> str:
    """Write report.md and the loss curves into the run dir and publish them as Prefect artifacts."""
    pngs = loss_curves(summary)
    for name, png in pngs.items():
        write_run_file(run_dir, f"{name}_loss.png", png)
        create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(png).decode(),
                              key=f"{name}-loss-curve", description=f"{preset}: {name} training loss")
    card = report.render_report({**run, "curves": {name: f"{name}_loss.png" for name in pngs}})
    write_run_file(run_dir, "report.md", card.encode())
    create_markdown_artifact(markdown=card, key="report-card", description=f"nanochat {preset} report card")
    evals = report.summary_evals(run)
    rows = [{"metric": row, **{col.upper(): evals[col].get(row, "-") for col in report.SUMMARY_COLUMNS}}
            for row in report.SUMMARY_ROWS]
    create_table_artifact(table=rows, key="report-summary", description=f"nanochat {preset}: BASE / MID / SFT / RL")
    return card


@flow(name="speedrun", log_prints=True)
def speedrun(
    preset: Preset = "tiny",
    store: str = "./store",
    port: int = 8000,
    host: str = "127.0.0.1",
    data: str | None = None,
    overrides: StageOverrides | None = None,  # type: ignore[valid-type]
    nproc: int = 1,
    serve: bool = True,
    rl: bool = False,
    nnodes: int = 1,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    serve_deployment: str | None = None,
    reuse: list[str] | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline for `preset` into `store` (RL too when `rl`); returns the run summary.

    overrides: per stage, config fields to change from the preset's values (empty fields keep them).
    nnodes > 1: distributed stages run on nnodes hosts (this one is node 0, reachable at master_addr); the
    others are `train-node` runs on work queues node-1.. (flows/multinode.py); the store must be shared.
    serve_deployment: the chat server is a run of this deployment (e.g. "serve/serve": cancel the run to stop
    the server); unset, it is a detached process.
    reuse: stages (pipeline nodes) to keep at their newest intact artifact even when their key changed; the
    stages after them key on that artifact."""
    logger = get_run_logger()
    overrides = overrides_dict(overrides)
    hosts = Nodes(nnodes, 0, master_addr, master_port)
    if not artifacts.is_remote(store):
        store = str(Path(store).expanduser().resolve())
    configs = stage_configs(preset, overrides, resolve_data(data), rl=rl)
    preflight.check_speedrun(configs, store, nproc, hosts, reuse or [], rl, serve=(host, port) if serve else None,
                             serve_deployment=serve_deployment)
    run_id = str(runtime.flow_run.id or uuid.uuid4())
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run_dir = artifacts.join_uri(store, "runs", run_id)
    logger.info(f"speedrun {preset}: store {store}, run {run_id}")

    order = stages.pipeline_of(configs, rl)
    nodes = {node.name: node for node in order}
    reuse = plan.check_reuse(reuse or [], order)
    modules = plan.code_modules_by_stage(order)
    refs: dict[str, artifacts.ArtifactRef] = {}
    summary: dict[str, Any] = {"run_id": run_id, "preset": preset, "started": started, "stages": {}, "reused": reuse,
                               "server": None}
    t_start = time.time()
    for node in order:
        inputs = {flag: refs[upstream] for flag, upstream in node.inputs}
        decision = plan.decide(node, configs[node.stage], inputs, store, nodes, modules[node.stage], reuse)
        if decision.reused:
            ref, seconds = decision.ref, 0.0
            logger.info(f"{node.name}: {decision.reasons[0]}")
        else:
            if not decision.cached:
                damaged = any(r.startswith(plan.DAMAGED) for r in decision.reasons)
                (logger.warning if damaged else logger.info)(f"{node.name} runs: {'; '.join(decision.reasons)}")
            built_on = plan.reused_ancestors(node, nodes, reuse)
            node_plan = decision.plan if not built_on else stages.with_reused(decision.plan, {
                name: artifacts.relative_to_store(refs[name].uri, store) for name in built_on})
            ref, _, seconds = run_stage(node.stage, configs[node.stage], inputs, store, nproc=nproc, name=node.name,
                                        nodes=hosts, plan=node_plan, intact=decision.cached)
        refs[node.name] = ref
        summary["stages"][node.name] = {"uri": ref.uri, "digest": ref.digest, "cached": decision.cached,
                                        "reused": decision.reused, "reasons": decision.reasons,
                                        "seconds": round(seconds, 2)}
        logger.info(f"{node.name}: {'Cached' if decision.cached else 'done'} in {seconds:.1f}s -> {ref.uri}")
    summary["wall_seconds"] = round(time.time() - t_start, 2)

    card = publish_report(run_dir, report_input(run_id, started, summary, configs, nodes), summary, preset)
    if serve:
        state_dir = artifacts.local_path(store) / "runs" if not artifacts.is_remote(store) else (
            Path.home() / ".cache" / "nanochat" / "servers")
        info = start_server_task(refs["sft"].to_dict(), host, port, str(state_dir), serve_deployment)
        summary["server"] = {k: info[k] for k in ("url", "port", "pid", "flow_run_id") if k in info}
    write_run_file(run_dir, "summary.json", json.dumps(summary, indent=2).encode())
    logger.info(f"report card: {artifacts.join_uri(run_dir, 'report.md')} ({len(card.splitlines())} lines)")
    logger.info(f"summary: {artifacts.join_uri(run_dir, 'summary.json')}")
    return summary
