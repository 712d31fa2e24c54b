"""The `nanochat` command.

    nanochat speedrun --preset tiny [--store DIR|s3://...] [--data DIR|URL] [--port 8000] [--set sft.num_iterations=30]
    nanochat serve --checkpoint URI [--host 127.0.0.1] [--port 8000]
    nanochat chat --checkpoint URI [-p PROMPT]

With no PREFECT_API_URL, flows run against Prefect's local ephemeral server.
"""

from __future__ import annotations

import argparse
import os
import sys

from nanochat_core.artifacts import ArtifactError
from nanochat_core.config import ConfigError
from nanochat_core.data.sources import DataError

USER_ERRORS = (ConfigError, DataError, ArtifactError, FileNotFoundError)


def quiet_prefect_defaults() -> None:
    """No telemetry or analytics calls from an offline machine, unless the user asked for them."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")


def cmd_speedrun(args: argparse.Namespace) -> int:
    from nanochat_core.presets import parse_override

    overrides: dict[str, dict] = {}
    for text in args.set or []:
        stage, field, value = parse_override(text)
        overrides.setdefault(stage, {})[field] = value
    quiet_prefect_defaults()
    from flows.speedrun import resolve_data, speedrun, stage_configs
    from nanochat_core.artifacts import check_store

    # Check what the user typed before any server or process starts, so mistakes fail in a second.
    check_store(args.store)
    stage_configs(args.preset, overrides, resolve_data(args.data))
    summary = speedrun(preset=args.preset, store=args.store, port=args.port, host=args.host, data=args.data,
                       overrides=overrides, nproc=args.nproc, serve=not args.no_serve)
    print("\nstage       cached  seconds  artifact")
    for name, info in summary["stages"].items():
        print(f"{name:<11} {'yes' if info['cached'] else 'no':<7} {info['seconds']:>7.1f}  {info['uri']}")
    if summary["server"]:
        print(f"\nchat server: {summary['server']['url']} (pid {summary['server']['pid']})")
    return 0


def _model_and_tokenizer(checkpoint: str) -> tuple[str, str]:
    from flows.serve import model_dirs
    from nanochat_core.artifacts import verify_artifact

    model_dir, tok_dir = model_dirs(verify_artifact(checkpoint, deep=True))
    return str(model_dir), str(tok_dir)


def cmd_serve(args: argparse.Namespace) -> int:
    from nanochat_core import server

    model_dir, tok_dir = _model_and_tokenizer(args.checkpoint)
    server.main(["--model", model_dir, "--tokenizer", tok_dir, "--host", args.host, "--port", str(args.port)])
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from nanochat_core import chat_cli

    model_dir, tok_dir = _model_and_tokenizer(args.checkpoint)
    argv = ["--model", model_dir, "--tokenizer", tok_dir]
    if args.prompt:
        argv += ["-p", args.prompt]
    chat_cli.main(argv)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanochat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("speedrun", help="run the whole pipeline for a preset and start the chat server")
    p.add_argument("--preset", default="tiny", help="tiny | d20 | d26 | d32")
    p.add_argument("--store", default="./store", help="artifact store: a directory or s3://bucket/prefix")
    p.add_argument("--data", default=None, help="data mirror directory or URL (default: $NANOCHAT_DATA, else HF)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--nproc", type=int, default=1, help="processes per node for the training stages")
    p.add_argument("--set", action="append", metavar="STAGE.FIELD=VALUE", help="override a stage config value")
    p.add_argument("--no-serve", action="store_true", help="stop after evaluation; do not start the server")
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser("serve", help="serve a chat model artifact (web UI + OpenAI-compatible API)")
    p.add_argument("--checkpoint", required=True, help="URI of a model artifact (e.g. <store>/sft/<key>)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with a model artifact in the terminal")
    p.add_argument("--checkpoint", required=True, help="URI of a model artifact")
    p.add_argument("-p", "--prompt", default=None, help="one prompt, answer, exit")
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except USER_ERRORS as e:
        print(f"nanochat: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
