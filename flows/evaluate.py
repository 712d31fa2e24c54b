"""The evaluate flow: one checkpoint, or every model under a store that has no result for the task set yet.

A result is the eval stage's artifact, `<store>/eval/<key>/`, and its key is the stage contract's: the model's
digest (a finished model's manifest digest, a checkpoint's content digest), the eval config (the task set,
max_per_task, sampling) and the eval code version. So nothing is evaluated twice: a second event for the
same checkpoint, the nightly cron run, or a speedrun that already evaluated its models all find the result.

Deployed twice (flows/deploy.py, deployments/prefect.yaml): on a cron schedule over a store, and on the
`nanochat.checkpoint.saved` event that training stages emit for each checkpoint they commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from flows.tasks import run_stage
from nanochat_core.checkpoint import checkpoint_meta
from nanochat_core.config import ConfigError, config_to_dict
from nanochat_core.pipeline import artifacts, stages


def eval_config(tasks: str, max_per_task: int, device_type: str) -> dict[str, Any]:
    """The eval stage config these parameters ask for, validated (a bad task name fails before any work)."""
    config = stages.make_config("eval", {"tasks": tasks, "max_per_task": max_per_task, "device_type": device_type})
    config.validate()
    return config_to_dict(config)


def local_store(store: str) -> str:
    return store if artifacts.is_remote(store) else str(Path(store).expanduser().resolve())


@flow(name="evaluate", log_prints=True)
def evaluate(
    checkpoint: str | None = None,
    store: str = "./store",
    tasks: str = "auto",
    max_per_task: int = -1,
    device_type: str = "",
    nproc: int = 1,
    missing_ok: bool = False,
) -> dict[str, Any]:
    """Evaluate `checkpoint` (a finished model or a checkpoint: a local directory, or its URI in an s3:// store),
    or with none every model in `store`.

    Results go to `store`; returns {"evaluated": [...], "already": [...]}, each entry {model, phase, step,
    result (the eval artifact's URI), metrics}. missing_ok (set by the checkpoint-event trigger): a checkpoint
    that is gone by the time this runs (training keeps only its newest few) is logged and skipped."""
    logger = get_run_logger()
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}")
    store = local_store(store)
    artifacts.check_store(store)
    config = eval_config(tasks, max_per_task, device_type)
    if checkpoint:
        exists = stages.model_exists(checkpoint)
        if not exists and missing_ok:
            logger.warning(f"evaluate: checkpoint {checkpoint} no longer exists (training keeps only its newest "
                           "checkpoints); nothing to evaluate")
            return {"evaluated": [], "already": []}
        if not exists:
            raise artifacts.ArtifactError(f"checkpoint {checkpoint} does not exist (no model directory there)")
        models = [checkpoint]
    else:
        models = stages.find_models(store)
    logger.info(f"evaluate: {len(models)} model(s), tasks {tasks!r}, results in {store}/eval")
    out: dict[str, list[dict[str, Any]]] = {"evaluated": [], "already": []}
    for model_dir in models:
        local = stages.local_model(model_dir)  # a model in a remote store: downloaded and checked
        inputs = {"model": stages.model_ref(model_dir, local), "tokenizer": stages.model_tokenizer(model_dir)}
        meta = checkpoint_meta(local)
        name = f"eval-{meta.get('stage', 'model')}-{meta.get('step', 'final')}"
        plan = stages.plan_stage("eval", config, inputs, store)  # config was validated once, above
        done = stages.find_done(plan)
        if done is not None:
            ref = done
        else:
            ref, _, seconds = run_stage("eval", config, inputs, store, nproc=nproc, name=name, plan=plan)
            logger.info(f"{name}: evaluated {model_dir} in {seconds:.1f}s")
        metrics = artifacts.read_manifest(ref.uri)["metrics"]
        entry = {"model": str(model_dir), "phase": meta.get("stage"), "step": meta.get("step"), "result": ref.uri,
                 "metrics": metrics}
        out["already" if done is not None else "evaluated"].append(entry)
        if done is not None:
            logger.info(f"{name}: {model_dir} already has a result for these tasks: {ref.uri}")
    rows = [{"model": e["model"], "phase": e["phase"], "step": e["step"], "new": kind == "evaluated",
             **{k: v for k, v in e["metrics"].items() if k not in ("phase", "step")}}
            for kind in ("evaluated", "already") for e in out[kind]]
    if rows:
        create_table_artifact(table=rows, key="evaluate-results", description=f"evaluation results ({tasks})")
    logger.info(f"evaluate: {len(out['evaluated'])} new, {len(out['already'])} already evaluated")
    return out
