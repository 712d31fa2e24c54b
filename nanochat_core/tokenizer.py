"""GPT-4 style BPE tokenizer: trained with rustbpe, run with tiktoken.

The vocabulary is 256 byte tokens, then the merges, then the 9 special tokens (ids len(ranks)+i).
Files (no pickle): `tokenizer.json` (pattern, special tokens, sha256 of the ranks file) and
`tokenizer.tiktoken` (one `base64(token_bytes) rank` line per token, tiktoken's own format).

The tokenizer stage (training on shards, the compression report) is nanochat_core.tok_train.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import tiktoken

from nanochat_core.errors import UserError
from nanochat_core.fileio import atomic_write_bytes

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, forced in at inference time
]
# GPT-4's pattern with \p{N}{1,2} instead of {1,3}: fewer tokens spent on numbers at small vocab sizes.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""  # noqa: E501
CONFIG_FILE = "tokenizer.json"
RANKS_FILE = "tokenizer.tiktoken"
FORMAT = "nanochat-tokenizer-v1"


class TokenizerError(UserError, ValueError):
    """Tokenizer files are missing or corrupt; the message names the file."""


class Tokenizer:
    """tiktoken Encoding + nanochat's special tokens and chat rendering."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        offset = len(mergeable_ranks)
        self._special = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self._special)
        self.bos_token_id = self._special["<|bos|>"]

    # ---- files

    def save(self, directory: str | Path) -> None:
        """Write the ranks file, then tokenizer.json (which records the ranks file's sha256)."""
        directory = Path(directory)
        ranks = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        ranks_data = b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks)
        config = {
            "format": FORMAT,
            "pattern": self.pattern,
            "special_tokens": self._special,
            "ranks_file": RANKS_FILE,
            "num_ranks": len(ranks),
            "ranks_sha256": hashlib.sha256(ranks_data).hexdigest(),
        }
        atomic_write_bytes(directory / RANKS_FILE, ranks_data)
        atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        config_path, ranks_path = directory / CONFIG_FILE, directory / RANKS_FILE
        try:
            config = json.loads(config_path.read_text())
            ranks_data = ranks_path.read_bytes()
        except FileNotFoundError as e:
            raise TokenizerError(f"tokenizer file missing: {e.filename} (is {directory} a tokenizer dir?)") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{config_path} is not valid JSON: {e}") from e
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise TokenizerError(f"{config_path}: not a {FORMAT} file")
        if hashlib.sha256(ranks_data).hexdigest() != config.get("ranks_sha256"):
            raise TokenizerError(f"{ranks_path} does not match the sha256 recorded in {config_path} (corrupt?)")
        ranks = _parse_ranks(ranks_data, ranks_path)
        tok = cls(ranks, config["pattern"])
        if tok._special != config.get("special_tokens"):
            raise TokenizerError(f"{config_path}: special tokens differ from this code's {SPECIAL_TOKENS}")
        return tok

    # ---- basics

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def encode_special(self, text: str) -> int:
        try:
            return self._special[text]
        except KeyError:
            raise ValueError(f"{text!r} is not a special token; they are {SPECIAL_TOKENS}") from None

    def encode(
        self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Encode text (or a list of texts, in parallel). Special-token strings in text stay ordinary text."""
        pre = [self._as_id(prepend)] if prepend is not None else []
        post = [self._as_id(append)] if append is not None else []
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [pre + row + post for row in rows] if pre or post else rows
        raise TypeError(f"encode expects str or list[str], got {type(text).__name__}")

    __call__ = encode

    def _as_id(self, token: int | str) -> int:
        return token if isinstance(token, int) else self.encode_special(token)

    def decode(self, ids: list[int]) -> str:
        try:
            return self.enc.decode(ids)
        except (KeyError, OverflowError) as e:
            raise ValueError(f"invalid token id (vocab size {self.get_vocab_size()}): {e}") from None

    def id_to_token(self, token_id: int) -> str:
        return self.decode([token_id])

    def token_bytes(self):
        """int32 tensor [vocab]: UTF-8 byte length of each token, 0 for special tokens (for bits per byte)."""
        import torch

        specials = set(self._special.values())
        lengths = [0 if i in specials else len(self.enc.decode_single_token_bytes(i)) for i in range(self.enc.n_vocab)]
        return torch.tensor(lengths, dtype=torch.int32)

    # ---- chat rendering

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a mask of the same length (1 = the assistant is trained on it).

        A leading system message is merged into the first user message ("system\\n\\nuser"); then roles
        must alternate user, assistant, user, ... The output is truncated to max_tokens.
        """
        messages, first_index = _chat_messages(conversation)
        s = self._special
        ids, mask = [], []

        def add(tokens: int | list[int], value: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([value] * len(tokens))

        add(self.bos_token_id, 0)
        for i, message in enumerate(messages):
            where = f"message {i + first_index}"
            if not isinstance(message, dict):
                raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
            expected = "user" if i % 2 == 0 else "assistant"
            if message.get("role") != expected:
                raise ValueError(f"{where} has role {message.get('role')!r} but should be {expected!r} "
                                 "(roles must alternate user/assistant, after an optional leading system message)")
            content = message.get("content")
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"{where}: user content must be a str, got {type(content).__name__}")
                add(s["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(s["<|user_end|>"], 0)
                continue
            add(s["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    self._add_part(part, where, add)
            else:
                raise ValueError(f"{where}: assistant content must be a str or a list of parts, "
                                 f"got {type(content).__name__}")
            add(s["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def _add_part(self, part: dict, where: str, add) -> None:
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: each part must be a dict with a str 'text', got {part!r:.80}")
        kind, value = part.get("type"), self.encode(part["text"])
        s = self._special
        if kind == "text":
            add(value, 1)
        elif kind == "python":  # the tool call is the assistant's own output: supervised
            add(s["<|python_start|>"], 1)
            add(value, 1)
            add(s["<|python_end|>"], 1)
        elif kind == "python_output":  # comes from the tool at inference time: not supervised
            add(s["<|output_start|>"], 0)
            add(value, 0)
            add(s["<|output_end|>"], 0)
        else:
            raise ValueError(f"{where}: unknown part type {kind!r} (expected text, python or python_output)")

    def render_for_completion(self, conversation: dict, max_tokens: int | None = None) -> list[int]:
        """The prompt for sampling the final assistant turn: the conversation without its last (assistant)
        message, ending with <|assistant_start|>. Not truncated unless max_tokens is given."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation whose last message is from the assistant")
        limit = max_tokens if max_tokens is not None else 2**62
        ids, _ = self.render_conversation({**conversation, "messages": messages[:-1]}, max_tokens=limit)
        return ids + [self._special["<|assistant_start|>"]]


def _chat_messages(conversation: dict) -> tuple[list, int]:
    """The messages to render (system merged into the first user message) and the index offset of the first."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is a dict with a non-empty 'messages' list")
    first = messages[0]
    if not (isinstance(first, dict) and first.get("role") == "system"):
        return messages, 0
    if len(messages) < 2 or not isinstance(messages[1], dict) or messages[1].get("role") != "user":
        raise ValueError("message 1: a system message must be followed by a user message")
    system, user = first.get("content"), messages[1].get("content")
    if not isinstance(system, str) or not isinstance(user, str):
        raise ValueError("messages 0-1: system and user content must be str")
    return [{**messages[1], "content": system + "\n\n" + user}] + messages[2:], 1


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}:{lineno}: expected 'base64 rank', got {line[:60]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
        raise TokenizerError(f"{path}: ranks must be 0..N-1 (N >= 256) with unique tokens")
    return ranks


# ---------------------------------------------------------------------------------------------
# the tokenizer stage
