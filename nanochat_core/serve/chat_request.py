"""Chat request bodies: validation into a ChatRequest, OpenAI-shaped errors, and stop strings.

Every way a body can be wrong ends in a RequestError (status 400 with OpenAI's error shape), never a 5xx:
the `openai` client retries 5xx. Every field that costs work is bounded (the MAX_* limits below; max_tokens by
the model's context), and the error names the field and its limit. The policy for fields, as OpenAI's own API
does: a field we do not know is an error (`unknown_parameter`), so a typo is not silently ignored; OpenAI
fields we do not implement (penalties, logprobs, tools, ...) are accepted only with the value that asks for
nothing; null means absent.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from nanochat_core.serve.server import ServeConfig

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_CHOICES = 8  # n
MAX_STOPS = 4  # OpenAI's limit on `stop` strings
MAX_STOP_CHARS = 256  # per stop string: the text held back per choice, and each token's stop check, scale with it
TOOL_PART = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>|<\|output_start\|>(.*?)<\|output_end\|>", re.S)

PARSED = {"messages", "temperature", "top_k", "top_p", "max_tokens", "max_completion_tokens", "n", "seed", "stream",
          "stream_options", "stop"}
IGNORED = {"model": str, "user": str, "metadata": dict, "store": bool, "service_tier": str}
NO_OP = {  # implemented only as the value that asks for nothing
    "frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},),
}


def _printable(text: str) -> str:
    """text with lone surrogates escaped, so that it can be encoded as UTF-8 in a response."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class RequestError(Exception):
    """A request we refuse; becomes an OpenAI-shaped error response."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        message, param = _printable(message), param and _printable(param)  # may quote the client's text
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass(frozen=True)
class ChatRequest:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float | None
    seed: int
    stream: bool
    include_usage: bool
    n: int = 1
    stop: tuple[str, ...] = ()


# -----------------------------------------------------------------------------
# messages

def _utf8(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: not text any tokenizer can take
        raise RequestError(f"{param} is not valid Unicode (it has a lone surrogate)", param) from None
    return text


def _message_text(content, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string", f"messages[{i}].content")
    if not content.strip():
        raise RequestError(f"messages[{i}].content is empty", f"messages[{i}].content")
    if len(content) > MAX_MESSAGE_CHARS:
        raise RequestError(f"messages[{i}].content has {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}",
                           f"messages[{i}].content")
    return _utf8(content, f"messages[{i}].content")


def _assistant_content(text: str) -> str | list[dict]:
    """Turn the tool markers that the server streams as text back into python / python_output parts."""
    parts, at = [], 0
    for m in TOOL_PART.finditer(text):
        if m.start() > at:
            parts.append({"type": "text", "text": text[at:m.start()]})
        kind = "python" if m.group(1) is not None else "python_output"
        parts.append({"type": kind, "text": m.group(1) if m.group(1) is not None else m.group(2)})
        at = m.end()
    if not parts:
        return text
    if at < len(text):
        parts.append({"type": "text", "text": text[at:]})
    return parts


def parse_messages(messages) -> list[dict]:
    """Validated messages: an optional system message, then user/assistant alternating, ending with user."""
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        got = f"{len(messages)} messages" if isinstance(messages, list) else f"a {type(messages).__name__}"
        raise RequestError(f"messages must be a list of 1 to {MAX_MESSAGES} messages, got {got}", "messages")
    out, total = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = "system" if message.get("role") == "developer" else message.get("role")
        text = _message_text(message.get("content"), i)
        total += len(text)
        turn = i - 1 if out and out[0]["role"] == "system" else i  # position after the system message
        expected = ("system", "user") if i == 0 else ("user",) if turn % 2 == 0 else ("assistant",)
        if role not in expected:
            raise RequestError(f"messages[{i}] has role {role!r} but should be {' or '.join(map(repr, expected))} "
                               "(roles alternate user/assistant after an optional first system message)",
                               f"messages[{i}].role")
        out.append({"role": role, "content": _assistant_content(text) if role == "assistant" else text})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"the messages have {total} characters in all; the limit is {MAX_TOTAL_CHARS}", "messages")
    if out[-1]["role"] != "user":
        raise RequestError("the last message must be from the user", "messages")
    return out


# -----------------------------------------------------------------------------
# the other fields

def _number(body: dict, name: str, default, low, high, integer: bool = False):
    """body[name] (default if absent or null), checked to be a number (an int if `integer`) in [low, high]."""
    value = body.get(name)
    if value is None:
        return default
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    if not ok:  # NaN fails the range check too
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'} in [{low}, {high}], "
                           f"got {str(value)[:100]}", name)
    return value


def _check_fields(body: dict) -> None:
    for name, value in body.items():
        if name in PARSED or value is None:
            continue
        if name in IGNORED:
            if not isinstance(value, IGNORED[name]):
                raise RequestError(f"{name} must be of type {IGNORED[name].__name__}", name)
        elif name in NO_OP:
            if value not in NO_OP[name]:
                raise RequestError(f"{name} is not supported by this server (only {NO_OP[name][0]!r})", name,
                                   "unsupported_parameter")
        else:
            raise RequestError(f"Unknown parameter: {name[:100]!r}.", name[:100], "unknown_parameter")


def _stop(value) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        got = f"{len(stops)} strings" if isinstance(stops, list) and len(stops) > MAX_STOPS else "something else"
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, got {got}",
                           "stop")
    for i, s in enumerate(stops):
        if len(s) > MAX_STOP_CHARS:
            name = "stop" if isinstance(value, str) else f"stop[{i}]"
            raise RequestError(f"{name} has {len(s)} characters; the limit is {MAX_STOP_CHARS}", "stop")
    return tuple(_utf8(s, "stop") for s in stops)


def parse_chat_request(body, tokenizer, seq_len: int, config: ServeConfig, openai: bool) -> ChatRequest:
    """The validated request, its prompt rendered; raises RequestError for anything wrong with it."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_fields(body)
    messages = parse_messages(body.get("messages"))
    vocab = tokenizer.get_vocab_size()
    temperature = float(_number(body, "temperature", config.temperature, 0.0, 2.0))
    top_k = _number(body, "top_k", min(config.top_k, vocab), 0, vocab, integer=True)
    top_p = _number(body, "top_p", None, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("top_p must be in (0, 1]", "top_p")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None, 1, seq_len, integer=True)
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    n = _number(body, "n", 1, 1, MAX_CHOICES if openai else 1, integer=True)
    stop = _stop(body["stop"]) if body.get("stop") is not None else ()
    stream = body.get("stream", False) if openai else True
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    room = seq_len - len(prompt)
    if max_tokens is None:
        max_tokens = min(config.max_tokens, room)
    if max_tokens < 1 or max_tokens > room:
        raise RequestError(
            f"This model's maximum context length is {seq_len} tokens. However, you requested "
            f"{len(prompt) + max(max_tokens, 1)} tokens ({len(prompt)} in the messages, {max(max_tokens, 1)} in the "
            "completion). Please reduce the length of the messages or completion.", "messages",
            "context_length_exceeded")
    seed = secrets.randbelow(2**31) if seed is None else seed % 2**63
    return ChatRequest(prompt, max_tokens, temperature, top_k, top_p, seed, stream,
                       bool(options.get("include_usage")), n, stop)


# -----------------------------------------------------------------------------
# stop strings

class StopText:
    """Text deltas cut at the first stop string. A tail that could be the start of one is held back until the
    next delta shows whether it is.

    Linear in the text: each stop string has a Knuth-Morris-Pratt matcher whose state (`matched`) is the length
    of the longest end of the text so far that begins that stop string, so each new character costs O(1)
    amortized per stop string, and the tail to hold back is the longest such state (< MAX_STOP_CHARS)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held, self.stopped = stops, "", False
        self.fallback = [_prefix_function(s) for s in stops]
        self.matched = [0] * len(stops)

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        text, cut = self.held + delta, None
        for j, (stop, fallback) in enumerate(zip(self.stops, self.fallback, strict=True)):
            k = self.matched[j]
            for at, ch in enumerate(delta, start=len(self.held) + 1):  # `at`: characters of text up to ch
                while k and stop[k] != ch:
                    k = fallback[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):  # this stop string's first occurrence; a match never starts before `held`
                    cut = at - k if cut is None else min(cut, at - k)
                    break
            self.matched[j] = k
        if cut is not None:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = max(self.matched)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.stopped else held


def _prefix_function(s: str) -> list[int]:
    """KMP's table: p[i] is the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    p = [0] * len(s)
    for i in range(1, len(s)):
        k = p[i - 1]
        while k and s[i] != s[k]:
            k = p[k - 1]
        p[i] = k + (s[i] == s[k])
    return p
