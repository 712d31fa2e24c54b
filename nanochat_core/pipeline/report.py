"""The run's markdown report card (nanochat's report.md) and loss-curve plots.

`render_report(run)` takes everything it shows from one dict, so the caller (a flow, a script) decides where
the numbers come from; the only things read here are facts about this machine for the header.

The run dict:
    {
      "run_id": "speedrun-tiny-...",            # any string
      "started": "2026-01-01T12:00:00+00:00",    # ISO time (or any string) the run started
      "seconds": 1234.5,                         # optional: total wall time; else the sum of stage times
      "stages": {                                # pipeline nodes in order; any subset, other names allowed
        "tokenizer": {"metrics": {...}, "config": {...}, "seconds": 12.3, "cached": False},
        "base": {...}, "base_eval": {"stage": "eval", ...}, "mid": {...}, "mid_eval": {...}, "sft": {...},
        "sft_eval": {...}, "rl": {...}, "rl_eval": {...},        # "stage": the stage a node runs, if not its name
      },
      "evals": {                                 # summary-table numbers per model phase, any subset
        "base": {"CORE": 0.22},
        "mid": {"ARC-Easy": 0.35, "GSM8K": 0.02, "ChatCORE": 0.07},
        "sft": {...}, "rl": {"GSM8K": 0.07},
      },
      "curves": {"base": "base_loss.png", ...}   # optional: loss-curve images (paths relative to the report)
    }
Cells "evals" lacks are filled from the `<phase>_eval` node's metrics (and the base node's own "CORE", if it
has one). The Wall time row adds up each phase's training and evaluation nodes. Missing cells show "-".
"""

from __future__ import annotations

import io
import math
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nanochat_core.fileio import atomic_write_bytes

STAGE_ORDER = ("shards", "tokenizer", "base", "base_eval", "mid", "mid_eval", "sft", "sft_eval", "rl", "rl_eval")
STAGE_TITLES = {
    "shards": "Data shards", "tokenizer": "Tokenizer training", "base": "Base model training",
    "base_eval": "Base model evaluation", "mid": "Midtraining", "mid_eval": "Midtraining evaluation",
    "sft": "Chat SFT", "sft_eval": "Chat evaluation (SFT)", "rl": "Chat RL", "rl_eval": "Chat evaluation (RL)",
}
# config fields worth showing per stage (all fields are shown for stages not listed)
CONFIG_HIGHLIGHTS = {
    "shards": ("num_shards", "dataset"),
    "tokenizer": ("vocab_size", "max_chars", "doc_cap"),
    "base": ("recipe", "disable", "precision", "depth", "max_seq_len", "device_batch_size", "total_batch_size",
             "num_iterations", "target_param_data_ratio", "matrix_lr", "embedding_lr", "unembedding_lr",
             "warmdown_ratio", "device_type"),
    "mid": ("num_iterations", "max_seq_len", "device_batch_size", "total_batch_size", "max_examples", "device_type"),
    "sft": ("recipe", "num_iterations", "max_seq_len", "device_batch_size", "max_examples", "init_lr_frac",
            "device_type"),
    "eval": ("tasks", "max_per_task", "max_new_tokens", "temperature", "top_k", "num_samples"),
    "rl": ("num_samples", "max_new_tokens", "temperature", "examples_per_step"),
}
# headline metrics shown first, in this order, when present; the rest follow alphabetically
METRIC_HIGHLIGHTS = ("vocab_size", "bytes_per_token", "val_bpb", "unigram_bpb", "CORE", "precision", "steps",
                     "tok_per_sec", "tokens_per_sec", "mfu", "train_seconds", "training_time", "val_loss", "train_loss")
SUMMARY_ROWS = ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE", "SpellingBee")
WALL_TIME_ROW = "Wall time"
SUMMARY_COLUMNS = ("base", "mid", "sft", "rl")


# -----------------------------------------------------------------------------
# formatting

def format_value(value: Any) -> str:
    """Floats with 4 decimals, big ints with thousands separators (as nanochat's report does)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{seconds:.1f}s"


def bullet_list(items: dict[str, Any]) -> list[str]:
    return [f"- {key}: {format_value(value)}" for key, value in items.items()]


# -----------------------------------------------------------------------------
# system info (the header)

def git_info() -> dict[str, str]:
    """Commit and dirty flag of the checkout this code runs from, or {} when it is not a git checkout."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit + (" (dirty)" if status else "")} if commit else {}


def gpu_info() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    return f"{count}x {props.name} ({props.total_memory / 2**30:.0f} GiB each)"


def system_info() -> dict[str, str]:
    import psutil
    import torch

    info = {
        "Platform": platform.platform(),
        "CPUs": str(os.cpu_count() or "unknown"),
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "GPU": gpu_info() or "none",
        "Python": sys.version.split()[0],
        "PyTorch": torch.__version__,
    }
    git = git_info()
    if git:
        info["Git commit"] = git["commit"]
    return info


# -----------------------------------------------------------------------------
# sections

def ordered_stages(stages: dict[str, Any]) -> list[str]:
    known = [s for s in STAGE_ORDER if s in stages]
    return known + [s for s in stages if s not in STAGE_ORDER]


def ordered_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    first = [k for k in METRIC_HIGHLIGHTS if k in metrics]
    return {k: metrics[k] for k in first + sorted(k for k in metrics if k not in first)}


def stage_section(name: str, stage: dict[str, Any], curve: str | None = None) -> list[str]:
    lines = [f"## {STAGE_TITLES.get(name, name)}", ""]
    seconds = stage.get("seconds")
    timing = format_duration(seconds) if isinstance(seconds, (int, float)) else "-"
    if stage.get("reused"):
        note = " (reused with --reuse: kept at its newest artifact although its key changed)"
    elif stage.get("cached"):
        note = " (cached: reused from an earlier run)"
    else:
        note = ""
    lines.append(f"wall time: {timing}{note}")
    config = stage.get("config") or {}
    wanted = CONFIG_HIGHLIGHTS.get(stage.get("stage", name))
    shown = {k: config[k] for k in wanted if k in config} if wanted is not None else dict(config)
    if shown:
        lines += ["", "Config:", *bullet_list(shown)]
    metrics = stage.get("metrics") or {}
    if metrics:
        lines += ["", "Metrics:", *bullet_list(ordered_metrics(metrics))]
    if curve:
        lines += ["", f"![{name} training loss]({curve})"]
    return lines + [""]


def summary_evals(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-phase numbers for the summary table: "evals", with gaps filled from the stages (module doc)."""
    stages = run.get("stages") or {}
    evals = run.get("evals") or {}
    table = {}
    for col in SUMMARY_COLUMNS:
        own = (stages.get(col) or {}).get("metrics") or {}
        from_eval = (stages.get(f"{col}_eval") or {}).get("metrics") or {}
        table[col] = {**({"CORE": own["CORE"]} if "CORE" in own else {}), **from_eval, **(evals.get(col) or {})}
    return table


def phase_seconds(run: dict[str, Any]) -> dict[str, float]:
    """Wall time per phase: its training node plus its evaluation node (phases that did not run are left out)."""
    stages = run.get("stages") or {}
    out = {}
    for col in SUMMARY_COLUMNS:
        times = [(stages.get(n) or {}).get("seconds") for n in (col, f"{col}_eval") if n in stages]
        times = [t for t in times if isinstance(t, (int, float))]
        if times:
            out[col] = float(sum(times))
    return out


def summary_table(evals: dict[str, dict[str, Any]], seconds: dict[str, float] | None = None) -> list[str]:
    header = "| Metric | " + " | ".join(c.upper() for c in SUMMARY_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(SUMMARY_COLUMNS) + 1)]
    for row in SUMMARY_ROWS:
        cells = []
        for column in SUMMARY_COLUMNS:
            value = (evals.get(column) or {}).get(row)
            cells.append(f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    seconds = seconds or {}
    cells = [format_duration(seconds[c]) if c in seconds else "-" for c in SUMMARY_COLUMNS]
    lines.append(f"| {WALL_TIME_ROW} | " + " | ".join(cells) + " |")
    return lines


def total_seconds(run: dict[str, Any]) -> float:
    if isinstance(run.get("seconds"), (int, float)):
        return float(run["seconds"])
    return sum(float(s.get("seconds") or 0.0) for s in (run.get("stages") or {}).values())


def render_report(run: dict[str, Any], system: dict[str, str] | None = None) -> str:
    """The markdown report card of a run (shape of `run` in the module docstring). `system` replaces the
    header's machine facts (tests pass a fixed one); by default they are read from this machine."""
    stages = run.get("stages") or {}
    system = system_info() if system is None else system
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = ["# nanochat training report", "", f"Generated: {generated}", ""]
    lines += [f"- Run: {run.get('run_id', '-')}", f"- Run started: {run.get('started', '-')}"]
    lines += ["", "## Environment", "", *bullet_list(system), ""]
    curves = run.get("curves") or {}
    for name in ordered_stages(stages):
        lines += stage_section(name, stages[name] or {}, curves.get(name))
    cached = sum(1 for s in stages.values() if (s or {}).get("cached"))
    reused = [name for name in ordered_stages(stages) if (stages[name] or {}).get("reused")]
    lines += ["## Summary", "", *summary_table(summary_evals(run), phase_seconds(run)), ""]
    lines.append(f"Total wall clock time: {format_duration(total_seconds(run))}"
                 + (f" ({cached} of {len(stages)} stages cached)" if cached else ""))
    if reused:
        lines.append(f"Reused with --reuse (not recomputed although their code or config changed): {', '.join(reused)}")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# loss curves

def save_loss_curve(points: list[tuple[float, float]], path: str | Path, title: str = "loss",
                    ylabel: str = "loss") -> None:
    """Plot [(step, loss), ...] to a PNG file, written atomically."""
    atomic_write_bytes(path, loss_curve_png(points, title, ylabel))


def loss_curve_png(points: list[tuple[float, float]], title: str = "loss", ylabel: str = "loss") -> bytes:
    """Plot [(step, loss), ...] as PNG bytes (Agg canvas, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("loss curve: no points to plot")
    try:
        pairs = [(float(step), float(loss)) for step, loss in points]
    except (TypeError, ValueError) as e:
        raise ValueError(f"loss curve: points must be (step, loss) number pairs: {e}") from e
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="." if len(pairs) < 50 else None)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
