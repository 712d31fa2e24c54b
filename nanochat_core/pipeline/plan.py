"""Whether each node of a run is `cached` (its artifact is in the store, intact) or `runs`, and why.

The same decisions serve `nanochat speedrun --dry-run` (no Prefect, nothing executed) and the real run, whose
log gives these reasons for every stage it executes. A node runs because:
- its upstream runs first (so its own key is not known yet), or an upstream artifact changed;
- its config changed (field: old -> new) or its code changed (which modules), against the newest artifact of the
  same node in the store;
- its artifact is missing, incomplete (a stopped run: it resumes from its checkpoints) or damaged.

`--reuse NODE` pins a node to its newest intact artifact even when its key changed (the user knows the edit does
not matter to it); the nodes after it then key on that artifact's digest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanochat_core.config import ConfigError
from nanochat_core.pipeline import artifacts, identity, stages
from nanochat_core.pipeline.artifacts import ArtifactError, ArtifactRef
from nanochat_core.pipeline.stages import Node, StagePlan

DAMAGED = "the stored artifact is damaged"


@dataclass
class Decision:
    node: str
    stage: str
    cached: bool
    reasons: list[str] = field(default_factory=list)
    plan: StagePlan | None = None  # None when an upstream runs first (its digest is not known yet)
    ref: ArtifactRef | None = None  # the artifact a cached node stands for (found, or pinned by --reuse)
    reused: bool = False

    def summary(self) -> dict[str, Any]:
        return {"cached": self.cached, "reasons": self.reasons, **({"reused": True} if self.reused else {})}


def code_modules_by_stage(nodes: Iterable[Node], project: Path | None = None) -> dict[str, dict[str, str]]:
    """Per-module code hashes of every stage in the run, read once per run (from `project`'s nanochat_core and
    rustbpe/src when given, e.g. a checkout being edited, else from this one)."""
    roots = (project / "nanochat_core", project / "rustbpe" / "src") if project else ()
    return {stage: identity.module_hashes(stages.STAGES[stage].module, *roots) for stage in {n.stage for n in nodes}}


def check_reuse(reuse: Iterable[str], nodes: Iterable[Node]) -> list[str]:
    """The --reuse names, each a node of this pipeline (ConfigError otherwise)."""
    names = [n.name for n in nodes]
    unknown = [r for r in reuse if r not in names]
    if unknown:
        raise ConfigError(f"--reuse {unknown[0]}: not a stage of this pipeline; stages are {', '.join(names)}")
    return list(dict.fromkeys(reuse))


def reused_ancestors(node: Node, nodes: dict[str, Node], reuse: Iterable[str]) -> list[str]:
    """The reused nodes this node is built on (directly or through other nodes), in pipeline order."""
    seen, todo = set(), [up for _, up in node.inputs]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [up for _, up in nodes[name].inputs]
    return [name for name in nodes if name in seen and name in set(reuse)]


# ---------------------------------------------------------------------------------------------
# the newest artifact of a node, to compare with


def _input_stages(manifest: dict[str, Any], store: str) -> dict[str, str]:
    """{flag: stage} of a manifest's recorded inputs when they are finished artifacts of the store (older manifests
    recorded them by full path)."""
    out = {}
    for flag, uri in (manifest.get("inputs") or {}).items():
        rel = artifacts.relative_to_store(artifacts.resolve_in_store(str(uri), store), store)
        parts = rel.split("/")
        if "://" not in rel and not rel.startswith("/") and len(parts) == 2:
            out[flag] = parts[0]
    return out


def node_artifacts(store: str, node: Node, nodes: dict[str, Node]) -> list[tuple[str, dict[str, Any]]]:
    """(uri, manifest) of the artifacts in the store made by this node's stage on the same kinds of input (an eval
    of the base model for base_eval, not of sft), newest first. Damaged manifests are passed over."""
    wanted = {flag: nodes[up].stage for flag, up in node.inputs}
    found = []
    for uri in artifacts.list_artifacts(store, node.stage):
        manifest = artifacts.manifest_or_none(uri, warn=False)
        if manifest is not None and _input_stages(manifest, store) == wanted:
            found.append((uri, manifest))
    return found


def newest_artifact(store: str, node: Node, nodes: dict[str, Node]) -> tuple[str, dict[str, Any]] | None:
    found = node_artifacts(store, node, nodes)
    return found[0] if found else None


def differences(stage: str, previous: dict[str, Any], config: dict[str, Any], modules: dict[str, str],
                upstream: dict[str, str] | None, input_nodes: dict[str, str]) -> list[str]:
    """Why this stage's key differs from the one of the previous artifact's manifest."""
    reasons = []
    old_config = previous.get("config") or {}
    for name in sorted(set(old_config) | set(config)):
        if old_config.get(name) != config.get(name):
            reasons.append(f"config {stage}.{name} changed: {_show(old_config.get(name))} -> {_show(config.get(name))}")
    old_modules = previous.get("code_modules") or {}
    if old_modules:
        changed = identity.changed_modules(old_modules, modules)
        if changed:
            reasons.append(f"code changed: {', '.join(changed)}")
    elif previous.get("code_version") != identity.code_version(modules):
        reasons.append("code changed (the earlier artifact does not record its modules)")
    for flag, digest in (upstream or {}).items():
        old = (previous.get("upstream") or {}).get(flag)
        if old != digest:
            reasons.append(f"upstream {input_nodes.get(flag, flag)} changed: {str(old)[:12]} -> {digest[:12]}")
    return reasons


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# decisions


def decide(node: Node, config: dict[str, Any], inputs: dict[str, ArtifactRef | None], store: str,
           nodes: dict[str, Node], modules: dict[str, str], reuse: Iterable[str] = ()) -> Decision:
    """Cached or runs, and why, for one node. `inputs` maps each flag to its upstream's artifact, or None when that
    upstream runs first in this run."""
    stage = node.stage
    input_nodes = dict(node.inputs)
    known = all(ref is not None for ref in inputs.values())
    plan = stages.plan_stage(stage, config, inputs, store, code_modules=modules) if known else None  # type: ignore[arg-type]
    if node.name in set(reuse):
        return _reused(node, plan, store, nodes)
    if plan is not None:
        done, why = stages.damage(plan, deep=True)
        if done is not None:
            return Decision(node.name, stage, True, [], plan, done)
        if artifacts.read_manifest_bytes(plan.uri) is not None:
            return Decision(node.name, stage, False, [f"{DAMAGED}: {why}; recomputing it"], plan)
    reasons = [f"upstream {input_nodes[flag]} runs first" for flag, ref in inputs.items() if ref is None]
    ident = plan.identity_config if plan else stages.identity_config(stage, config)
    upstream = plan.upstream if plan else None
    # explained against the closest artifact of this node (fewest differences; the newest of equals): a store
    # holding several configs of a stage then says what this run changed, not how it differs from another config
    candidates = [differences(stage, manifest, ident, modules, upstream, input_nodes)
                  for _, manifest in node_artifacts(store, node, nodes)]
    if not candidates:
        reasons.append(f"no {stage} artifact of this kind in the store yet")
    else:
        reasons += min(candidates, key=len)
    if plan is not None and _has_checkpoints(plan):
        reasons.append(f"an unfinished run left checkpoints in {plan.work_dir}: it resumes from the newest")
    if not reasons:
        reasons.append("the artifact for this key is missing")
    return Decision(node.name, stage, False, reasons, plan)


def _has_checkpoints(plan: StagePlan) -> bool:
    return (plan.work_dir / "checkpoints").is_dir() and any((plan.work_dir / "checkpoints").glob("step_*"))


def _reused(node: Node, plan: StagePlan | None, store: str, nodes: dict[str, Node]) -> Decision:
    """--reuse: the artifact of the current key when it is intact, else the newest intact one of this node."""
    if plan is not None:
        done, _ = stages.damage(plan, deep=True)
        if done is not None:
            return Decision(node.name, node.stage, True, [], plan, done)
    previous = newest_artifact(store, node, nodes)
    if previous is None:
        raise ArtifactError(f"--reuse {node.name}: the store {store} holds no {node.stage} artifact to reuse")
    try:
        ref = artifacts.verify_artifact(previous[0], deep=True)
    except ArtifactError as e:
        raise ArtifactError(f"--reuse {node.name}: its newest artifact is damaged ({e}); run without --reuse "
                            f"{node.name} to recompute it") from e
    return Decision(node.name, node.stage, True, [f"reused (--reuse {node.name}): {ref.uri}"], plan, ref, reused=True)


def dry_run(configs: dict[str, dict[str, Any]], store: str, rl: bool = False, reuse: Iterable[str] = (),
            project: Path | None = None) -> dict[str, Decision]:
    """Every node's decision, in pipeline order, without running anything (for the code of `project`, a checkout,
    when given)."""
    order = stages.pipeline_of(configs, rl)
    nodes = {n.name: n for n in order}
    reuse = check_reuse(reuse, order)
    modules = code_modules_by_stage(order, project)
    refs: dict[str, ArtifactRef | None] = {}
    out = {}
    for node in order:
        inputs = {flag: refs[up] for flag, up in node.inputs}
        decision = decide(node, configs[node.stage], inputs, store, nodes, modules[node.stage], reuse)
        refs[node.name] = decision.ref if decision.cached else None
        out[node.name] = decision
    return out
