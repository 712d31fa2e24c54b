"""The `nanochat` command.

    nanochat speedrun --preset tiny [--store DIR|s3://...] [--data DIR|URL] [--port 8000] [--set sft.num_iterations=30]
                      [--rl] [--reuse STAGE ...] [--dry-run [--json]]
    nanochat evaluate [--checkpoint DIR] [--store DIR] [--tasks auto|CORE,ARC-Easy,...] [--max-per-task N]
    nanochat serve --checkpoint URI [--host 127.0.0.1] [--port 8000]
    nanochat chat --checkpoint URI [-p PROMPT]
    nanochat import --upstream CKPT_DIR [--tokenizer TOK_DIR] [--step N] [--phase base|mid|sft|rl] [--store URI]
                    (a checkpoint written by upstream nanochat as a model artifact; prints its URI last)
    nanochat deploy [--store DIR] [--pool nanochat] [--cron "0 3 * * *"] [--serve]
                    (register the deployments on a process work pool; --serve: run them in this process)

With no PREFECT_API_URL, flows run against Prefect's local ephemeral server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from nanochat_core.config import ConfigError
from nanochat_core.errors import UserError
from nanochat_core.pipeline.artifacts import ArtifactError

USER_ERRORS = (UserError, ArtifactError, FileNotFoundError)


def quiet_prefect_defaults() -> None:
    """Offline- and cold-start-safe Prefect defaults (no telemetry or analytics calls, a generous ephemeral
    server start-up timeout), each unless the user set it: see flows/prefect_env.py."""
    from flows.prefect_env import offline_defaults

    offline_defaults()


def cmd_speedrun(args: argparse.Namespace) -> int:
    from nanochat_core.pipeline import preflight
    from nanochat_core.pipeline.artifacts import is_remote, join_uri
    from nanochat_core.pipeline.launch import Nodes
    from nanochat_core.pipeline.presets import parse_override, resolve_data, stage_configs

    overrides: dict[str, dict] = {}
    for text in args.set or []:
        stage, field, value = parse_override(text)
        overrides.setdefault(stage, {})[field] = value
    if args.json and not args.dry_run:
        raise ConfigError("--json goes with --dry-run")
    # Check everything that can be checked before any server or process starts, so mistakes fail in seconds.
    configs = stage_configs(args.preset, overrides, resolve_data(args.data), rl=args.rl)
    store = args.store if is_remote(args.store) else str(Path(args.store).expanduser().resolve())
    preflight.check_speedrun(configs, store, args.nproc, Nodes(args.nnodes, 0, args.master_addr, args.master_port),
                             args.reuse or [], args.rl, serve=None if args.no_serve else (args.host, args.port))
    if args.dry_run:
        return dry_run(configs, args)
    quiet_prefect_defaults()
    from flows.prefect_env import api_server_for_this_command
    from flows.speedrun import speedrun

    hide_prefect_tracebacks()
    with api_server_for_this_command():
        summary = speedrun(preset=args.preset, store=args.store, port=args.port, host=args.host, data=args.data,
                           overrides=overrides, nproc=args.nproc, serve=not args.no_serve, rl=args.rl,
                           nnodes=args.nnodes, master_addr=args.master_addr, master_port=args.master_port,
                           reuse=args.reuse or [])
    print("\nstage       cached  seconds  artifact")
    for name, info in summary["stages"].items():
        cached = "reused" if info.get("reused") else "yes" if info["cached"] else "no"
        print(f"{name:<11} {cached:<7} {info['seconds']:>7.1f}  {info['uri']}")
    print(f"\nreport card: {join_uri(args.store, 'runs', summary['run_id'], 'report.md')}")
    if summary["server"]:
        server = summary["server"]
        holder = f"pid {server['pid']}" if "pid" in server else f"flow run {server['flow_run_id']}"
        print(f"\nchat server: {server['url']} ({holder})")
    return 0


def dry_run(configs: dict[str, dict], args: argparse.Namespace) -> int:
    """Plan the run and say, per stage, `cached` or `runs` and why; executes nothing and needs no Prefect server."""
    from nanochat_core.pipeline import artifacts, plan

    store = args.store if artifacts.is_remote(args.store) else str(Path(args.store).expanduser().resolve())
    decisions = plan.dry_run(configs, store, rl=args.rl, reuse=args.reuse or [])
    if args.json:
        print(json.dumps({"stages": {name: d.summary() for name, d in decisions.items()}}, indent=2))
        return 0
    for name, d in decisions.items():
        state = "cached (reused)" if d.reused else "cached" if d.cached else "runs"
        print(f"{name:<11} {state}")
        for reason in d.reasons if not d.cached else []:
            print(f"{'':<11}   - {reason}")
    runs = [name for name, d in decisions.items() if not d.cached]
    print(f"\n{len(runs)} of {len(decisions)} stages would run" + (f": {', '.join(runs)}" if runs else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    quiet_prefect_defaults()
    from flows.evaluate import eval_config, evaluate
    from nanochat_core.pipeline.artifacts import check_store

    check_store(args.store)
    eval_config(args.tasks, args.max_per_task, args.device_type)
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} is not a directory")
    from flows.prefect_env import api_server_for_this_command

    hide_prefect_tracebacks()
    with api_server_for_this_command():
        out = evaluate(checkpoint=args.checkpoint, store=args.store, tasks=args.tasks, max_per_task=args.max_per_task,
                       device_type=args.device_type, nproc=args.nproc)
    for kind in ("evaluated", "already"):
        for e in out[kind]:
            shown = {k: v for k, v in e["metrics"].items() if k not in ("phase", "step")}
            print(f"{'new ' if kind == 'evaluated' else 'kept'} {e['phase']} step {e['step']}: {json.dumps(shown)}")
    if not out["evaluated"] and not out["already"]:
        print("no models found")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    quiet_prefect_defaults()
    from flows.deploy import register, serve_deployments
    from nanochat_core.pipeline.artifacts import check_store

    check_store(args.store)
    if args.serve:
        serve_deployments(args.store, cron=args.cron, tasks=args.tasks, max_per_task=args.max_per_task)
        return 0
    register(args.store, pool=args.pool, cron=args.cron, tasks=args.tasks, max_per_task=args.max_per_task)
    print(f"\nregistered speedrun, serve and evaluate on the process work pool {args.pool!r}; run them with\n"
          f"  prefect worker start --pool {args.pool}")
    if not os.environ.get("PREFECT_API_URL"):
        print("(no PREFECT_API_URL: they went to the local ephemeral server's database; see deployments/README.md)")
    return 0


def _model_and_tokenizer(checkpoint: str) -> tuple[str, str]:
    from flows.serve import model_dirs
    from nanochat_core.pipeline.artifacts import verify_artifact

    model_dir, tok_dir = model_dirs(verify_artifact(checkpoint, deep=True))
    return str(model_dir), str(tok_dir)


def cmd_serve(args: argparse.Namespace) -> int:
    from nanochat_core.serve import server

    model_dir, tok_dir = _model_and_tokenizer(args.checkpoint)
    server.main(["--model", model_dir, "--tokenizer", tok_dir, "--host", args.host, "--port", str(args.port)])
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from nanochat_core.serve import chat_cli

    model_dir, tok_dir = _model_and_tokenizer(args.checkpoint)
    argv = ["--model", model_dir, "--tokenizer", tok_dir]
    if args.prompt:
        argv += ["-p", args.prompt]
    chat_cli.main(argv)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from nanochat_core.pipeline.import_upstream import import_upstream

    imported = import_upstream(args.upstream, args.store, tokenizer_dir=args.tokenizer, step=args.step,
                               phase=args.phase)
    print(imported.model.uri)  # last line: what scripts read
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanochat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("speedrun", help="run the whole pipeline for a preset and start the chat server")
    p.add_argument("--preset", default="tiny",
                   help="tiny | d20 | d26 | d32 (November 2025) | tiny-2026 | d12-2026 | gpt2 (2026 record recipe)")
    p.add_argument("--store", default="./store", help="artifact store: a directory or s3://bucket/prefix")
    p.add_argument("--data", default=None, help="data mirror directory or URL (default: $NANOCHAT_DATA, else HF)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--nproc", type=int, default=1, help="processes per node for the training stages")
    p.add_argument("--set", action="append", metavar="STAGE.FIELD=VALUE", help="override a stage config value")
    p.add_argument("--no-serve", action="store_true", help="stop after evaluation; do not start the server")
    p.add_argument("--rl", action="store_true", help="also run the optional RL stage (GSM8K) after SFT")
    p.add_argument("--nnodes", type=int, default=1, help="hosts for the training stages (workers on node-K queues)")
    p.add_argument("--master-addr", default="127.0.0.1", help="this host's address, reachable from the others")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port on this host")
    p.add_argument("--reuse", action="append", metavar="STAGE",
                   help="keep this stage's newest intact artifact even if its key changed (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="say per stage whether it is cached or runs, and why; run nothing (no Prefect needed)")
    p.add_argument("--json", action="store_true", help="with --dry-run: print one JSON object")
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint, or every model in the store without a result")
    p.add_argument("--checkpoint", default=None, help="a model or checkpoint directory (default: all in --store)")
    p.add_argument("--store", default="./store", help="store to scan and to keep results in")
    p.add_argument("--tasks", default="auto", help="auto (CORE for base, chat tasks for chat models) or a list")
    p.add_argument("--max-per-task", type=int, default=-1, help="items per task (-1: all)")
    p.add_argument("--device-type", default="", help="cpu | cuda | mps (default: autodetect)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per evaluation")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("deploy", help="register the speedrun/serve/evaluate deployments on a process work pool")
    p.add_argument("--store", default="./store", help="the store the deployments use")
    p.add_argument("--pool", default="nanochat", help="process work pool (created if missing)")
    p.add_argument("--cron", default="0 3 * * *", help="schedule of the evaluate deployment (UTC)")
    p.add_argument("--tasks", default="auto", help="task set of scheduled and event-triggered evaluations")
    p.add_argument("--max-per-task", type=int, default=-1)
    p.add_argument("--serve", action="store_true", help="no pool or worker: run their flow runs in this process")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("serve", help="serve a chat model artifact (web UI + OpenAI-compatible API)")
    p.add_argument("--checkpoint", required=True, help="URI of a model artifact (e.g. <store>/sft/<key>)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with a model artifact in the terminal")
    p.add_argument("--checkpoint", required=True, help="URI of a model artifact")
    p.add_argument("-p", "--prompt", default=None, help="one prompt, answer, exit")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("import", help="import a checkpoint written by upstream nanochat as a model artifact")
    p.add_argument("--upstream", required=True, metavar="CKPT_DIR",
                   help="upstream checkpoint directory (model_<step>.pt, meta_<step>.json), e.g. "
                        "~/.cache/nanochat/base_checkpoints/d20")
    p.add_argument("--tokenizer", default=None, metavar="TOK_DIR",
                   help="directory of upstream's tokenizer.pkl (default: <base dir>/tokenizer as upstream lays "
                        "it out, else a tokenizer directory beside CKPT_DIR)")
    p.add_argument("--step", type=int, default=None, help="the step to import (default: the newest)")
    p.add_argument("--phase", default=None, choices=["base", "mid", "sft", "rl"],
                   help="what the model is (default: from the directory name, base_checkpoints -> base, ...)")
    p.add_argument("--store", default="./store", help="artifact store: a directory or s3://bucket/prefix")
    p.set_defaults(func=cmd_import)
    return parser


class Terminated(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt
    """SIGTERM to this process: raised in the main thread, as Ctrl-C raises KeyboardInterrupt, so that the
    command unwinds (its stage processes and Prefect API server stopped) instead of dying where it stands."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def hide_prefect_tracebacks() -> None:
    """Prefect's terminal log lines keep their message but not the exception's traceback: a failed run ends with
    one line from main(); the traceback stays in the run's Prefect logs and in main()'s error log file."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, WithoutTraceback):
            handler.setFormatter(WithoutTraceback(handler.formatter or logging.Formatter()))


class WithoutTraceback:
    """A logging formatter that formats a copy of each record without its exception (other handlers, like the
    one sending logs to Prefect's API, still get the traceback)."""

    def __init__(self, inner):
        self.inner = inner

    def format(self, record):
        import logging

        plain = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(plain)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def error_log(command: str) -> Path:
    """Where a failed command's traceback goes: ~/.cache/nanochat/errors/ (the system temp dir if that is not
    writable)."""
    import tempfile
    import time

    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (Path.home() / ".cache" / "nanochat" / "errors", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder / name
        except OSError:
            continue
    return Path(name)


def fail(message: str, code: int) -> None:
    print(f"nanochat: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


RESUME_HINT = "finished stages and saved checkpoints are kept; run the same command again to resume"


def main(argv: list[str] | None = None) -> None:
    """Run a command. It ends with one line on the terminal when it does not succeed: `error: <message>` and exit
    2 for something the user can fix, exit 130/143 on Ctrl-C/SIGTERM (after its processes stopped), and for
    anything else the error and where its traceback was written, exit 1."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        code = args.func(args)
    except USER_ERRORS as e:
        fail(f"error: {' '.join(str(e).split())}", 2)
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C)" + (f"; {RESUME_HINT}" if args.command == "speedrun" else ""), 130)
    except Terminated:
        fail("stopped by SIGTERM" + (f"; {RESUME_HINT}" if args.command == "speedrun" else ""), 143)
    except Exception as e:  # noqa: BLE001 - a bug or a failed stage: one line here, the traceback in a file
        import traceback

        log = error_log(args.command)
        log.write_text("".join(traceback.format_exception(e)))
        first = (str(e).strip().splitlines() or [""])[0]
        fail(f"error: {type(e).__name__}: {first} (traceback: {log})", 1)
    sys.exit(code)


if __name__ == "__main__":
    main()
