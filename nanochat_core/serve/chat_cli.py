"""Chat with a model in the terminal.

    python -m nanochat_core.serve.chat_cli --model DIR --tokenizer DIR [-p PROMPT]
        [--temperature 0.6] [--top-k 50] [--max-tokens 256] [--seed N] [--device-type cpu|cuda|mps]

With -p it answers that one prompt and exits. Otherwise it is a REPL: type a message; 'clear' starts a new
conversation; 'quit', 'exit' or Ctrl-D leaves. The conversation is one growing token list
([bos, user_start ... user_end, assistant_start ... assistant_end, ...]) so each turn sees the ones before.
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import TextIO

import torch

from nanochat_core.device import autocast_context
from nanochat_core.engine import Engine, IncrementalDecoder


class Conversation:
    def __init__(self, engine: Engine, tokenizer, temperature: float = 0.6, top_k: int = 50,
                 max_tokens: int = 256, seed: int | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.temperature, self.top_k, self.max_tokens = temperature, top_k, max_tokens
        self.rng = random.Random(seed)
        self.special = {name: tokenizer.encode_special(f"<|{name}|>")
                        for name in ("user_start", "user_end", "assistant_start", "assistant_end")}
        self.device = next(engine.model.parameters()).device
        self.clear()

    def clear(self) -> None:
        self.tokens = [self.tokenizer.get_bos_token_id()]

    def reply(self, text: str, out: TextIO) -> str:
        """Stream the assistant's answer to `text` into `out` and add the turn to the conversation."""
        s = self.special
        prompt = self.tokens + [s["user_start"], *self.tokenizer.encode(text), s["user_end"], s["assistant_start"]]
        room = self.engine.model.config.sequence_len - len(prompt)
        if room < 1:
            out.write("(the conversation no longer fits the model's context; type 'clear' to start over)\n")
            return ""
        decoder, stops = IncrementalDecoder(self.tokenizer), (s["assistant_end"], self.engine.bos)
        steps = self.engine.generate(prompt, 1, max_tokens=min(self.max_tokens, room), temperature=self.temperature,
                                     top_k=self.top_k, seed=self.rng.randrange(2**31))
        with autocast_context(self.device):
            for column, _ in steps:
                if column[0] in stops:
                    break
                out.write(decoder.push(column[0]))
                out.flush()
        out.write(decoder.flush() + "\n")
        out.flush()
        self.tokens = prompt + decoder.tokens + [s["assistant_end"]]  # a cut-off answer is closed too
        return decoder.text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.serve.chat_cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (model.pt + meta.json)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("-p", "--prompt", default=None, help="answer this prompt and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6)
    p.add_argument("-k", "--top-k", type=int, default=50, help="0 = no top-k")
    p.add_argument("-m", "--max-tokens", type=int, default=256, help="most tokens per answer")
    p.add_argument("--seed", type=int, default=None, help="fix the sampling seed (default: random)")
    p.add_argument("--device-type", default="", choices=["", "cpu", "cuda", "mps"], help="default: autodetect")
    return p


def main(argv: list[str] | None = None) -> None:
    from nanochat_core.checkpoint import load_model
    from nanochat_core.common import autodetect_device_type
    from nanochat_core.tokenizer import Tokenizer

    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.temperature <= 2.0:
        parser.error(f"--temperature must be in [0, 2], got {args.temperature}")
    if args.top_k < 0 or args.max_tokens < 1:
        parser.error("--top-k must be >= 0 and --max-tokens >= 1")
    device = torch.device(args.device_type or autodetect_device_type())
    try:
        model, _ = load_model(args.model, device)
        tokenizer = Tokenizer.load(args.tokenizer)
    except (ValueError, RuntimeError, OSError) as e:  # CheckpointError, TokenizerError, ...
        sys.exit(f"nanochat chat: error: {e}")
    chat = Conversation(Engine(model, tokenizer), tokenizer, args.temperature, args.top_k, args.max_tokens, args.seed)
    if args.prompt is not None:
        chat.reply(args.prompt, sys.stdout)
        return
    print("nanochat: type a message; 'clear' starts over, 'quit' or 'exit' (or Ctrl-D) leaves.")
    while True:
        try:
            text = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.lower() in ("quit", "exit"):
            return
        if text.lower() == "clear":
            chat.clear()
            print("(new conversation)")
            continue
        if text:
            print("nanochat: ", end="", flush=True)
            try:
                chat.reply(text, sys.stdout)
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the program
                print("\n(stopped)")


if __name__ == "__main__":
    main()
