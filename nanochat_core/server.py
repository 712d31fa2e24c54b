"""The chat server: a web UI, nanochat's streaming API and an OpenAI-compatible API over one model.

    python -m nanochat_core.server --model DIR --tokenizer DIR [--host 127.0.0.1] [--port 8000]
        [--temperature 0.8] [--top-k 50] [--max-tokens 512] [--device-type cuda|cpu|mps] [--api-key KEY]

GET /                       the chat UI (ui.html)
GET /health                 {"status": "ok", "ready": true, ...} (no API key needed)
GET /stats                  request and token counters
POST /chat/completions      nanochat's SSE stream: data: {"token": "..."} ... data: {"done": true}
POST /v1/chat/completions   OpenAI chat completions (stream or not); GET /v1/models

Bad requests get status 400 with OpenAI's error shape ({"error": {message, type, param, code}}), never a
422 or a 5xx (the openai client retries those). Generation runs on a worker thread, so the event loop keeps
answering /health and streaming; a lock lets one request use the model at a time (continuous batching will
replace it). A client that disconnects stops its generation at the next token. With --api-key (or
$NANOCHAT_API_KEY) every endpoint except / and /health wants `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from nanochat_core.config import ConfigError, add_config_arguments, config_from_args
from nanochat_core.engine import Engine, IncrementalDecoder
from nanochat_core.train.common import autocast_context

logger = logging.getLogger("nanochat.server")

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 1 << 20
MAX_QUEUED = 64  # requests waiting for the model beyond this get 429
UI_PATH = Path(__file__).with_name("ui.html")
TOOL_PART = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>|<\|output_start\|>(.*?)<\|output_end\|>", re.S)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    temperature: float = 0.8  # defaults for requests that do not say
    top_k: int = 50
    max_tokens: int = 512
    device_type: str = ""  # "" = autodetect (cuda > mps > cpu)
    api_key: str = ""  # "" = no authentication

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"ServeConfig.port: {self.port} is not a TCP port (0-65535)")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"ServeConfig.temperature must be in [0, 2], got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"ServeConfig.top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        if self.max_tokens < 1:
            raise ConfigError(f"ServeConfig.max_tokens must be >= 1, got {self.max_tokens}")
        if self.device_type not in ("", "cpu", "cuda", "mps"):
            raise ConfigError(f"ServeConfig.device_type must be '', 'cpu', 'cuda' or 'mps', got {self.device_type!r}")


class RequestError(Exception):
    """A request we refuse; becomes an OpenAI-shaped error response."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -----------------------------------------------------------------------------
# requests

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
    return content


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
        raise RequestError(f"messages must be a list of 1 to {MAX_MESSAGES} messages", "messages")
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
                           f"got {value!r}", name)
    return value


def parse_chat_request(body, tokenizer, seq_len: int, config: ServeConfig, openai: bool) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
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
    _number(body, "n", 1, 1, 1, integer=True)  # one choice per request
    stream = body.get("stream", False) if openai else True
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
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
                       bool(options.get("include_usage")))


# -----------------------------------------------------------------------------
# generation on a worker thread

class ModelWorker:
    """Owns the engine; generations run one at a time (self.lock) on worker threads."""

    def __init__(self, model, tokenizer):
        self.engine = Engine(model, tokenizer)
        self.device = next(model.parameters()).device
        self.stop_tokens = {self.engine.assistant_end, self.engine.bos}
        self.lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.stats = {"requests_total": 0, "requests_active": 0, "requests_queued": 0, "requests_disconnected": 0,
                      "tokens_generated": 0}

    def count(self, **deltas: int) -> None:
        with self.stats_lock:
            for key, delta in deltas.items():
                self.stats[key] += delta

    def generate(self, req: ChatRequest, stop: threading.Event, emit) -> str:
        """Blocking: emit(token) for each generated token; returns the finish reason (stop/length/cancelled)."""
        self.count(requests_total=1, requests_queued=1)
        with self.lock:
            self.count(requests_queued=-1, requests_active=1)
            try:
                if stop.is_set():
                    return "cancelled"
                steps = self.engine.generate(req.prompt, 1, max_tokens=req.max_tokens, temperature=req.temperature,
                                             top_k=req.top_k, top_p=req.top_p, seed=req.seed)
                with autocast_context(self.device), contextlib.closing(steps):
                    for column, _ in steps:
                        self.count(tokens_generated=1)
                        if column[0] in self.stop_tokens:
                            return "stop"
                        emit(column[0])
                        if stop.is_set():
                            return "cancelled"
                return "length"
            finally:
                self.count(requests_active=-1)


class Generation:
    """One request's generation: runs ModelWorker.generate on a thread, hands tokens to the event loop."""

    def __init__(self, worker: ModelWorker, req: ChatRequest):
        self.worker, self.req = worker, req
        self.stop = threading.Event()
        self.finish_reason = "cancelled"
        self.tokens: list[int] = []

    async def stream(self) -> AsyncIterator[int]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): stop generating
                self.stop.set()

        def run() -> None:
            try:
                put(("done", self.worker.generate(self.req, self.stop, lambda t: put(("token", t)))))
            except Exception as e:  # handed to the request, which reports it
                put(("error", e))

        started = time.perf_counter()
        threading.Thread(target=run, name="nanochat-generate", daemon=True).start()
        try:
            while True:
                kind, value = await queue.get()
                if kind == "token":
                    self.tokens.append(value)
                    yield value
                elif kind == "error":
                    raise value
                else:
                    self.finish_reason = value
                    return
        finally:
            self.stop.set()  # the client went away, or we are done: the worker stops at its next token
            if self.finish_reason == "cancelled":
                self.worker.count(requests_disconnected=1)
            seconds = time.perf_counter() - started
            logger.info(f"prompt {len(self.req.prompt)} tok, generated {len(self.tokens)} tok in {seconds:.2f}s "
                        f"({self.finish_reason})")

    async def collect(self, request: Request) -> list[int]:
        """All tokens (no streaming); stops early if the client disconnects."""

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            self.stop.set()

        watcher = asyncio.create_task(watch())
        try:
            async for _ in self.stream():
                pass
        finally:
            watcher.cancel()
        return self.tokens


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def text_deltas(gen: Generation, tokenizer) -> AsyncIterator[str]:
    decoder = IncrementalDecoder(tokenizer)
    async for token in gen.stream():
        if delta := decoder.push(token):
            yield delta
    if tail := decoder.flush():
        yield tail


# -----------------------------------------------------------------------------
# the app

def create_app(model, tokenizer, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    config.validate()
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.get_vocab_size()} exceeds the model's {model.config.vocab_size}")
    worker = ModelWorker(model, tokenizer)
    seq_len = model.config.sequence_len
    model_id = f"nanochat-d{model.config.n_layer}"
    started = time.time()
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.exception_handler(RequestError)
    async def request_error(_request, e: RequestError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return RequestError(str(e.detail), status=e.status_code, kind=kind).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, e: RequestValidationError):
        return RequestError(f"invalid request: {e.errors()}").response()

    def authorize(request: Request) -> None:
        if not config.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise RequestError("missing or incorrect API key (send Authorization: Bearer KEY)", None,
                               "invalid_api_key", status=401)

    async def read_chat_request(request: Request, openai: bool) -> ChatRequest:
        authorize(request)
        raw = b""
        async for piece in request.stream():  # read in pieces so a huge body is refused before it is all in memory
            raw += piece
            if len(raw) > MAX_BODY_BYTES:
                raise RequestError(f"the request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or nesting deep enough to blow the stack
            raise RequestError(f"could not parse the JSON body: {e}") from None
        req = parse_chat_request(body, tokenizer, seq_len, config, openai)
        if worker.stats["requests_queued"] >= MAX_QUEUED:
            raise RequestError("the server is busy; try again shortly", None, "rate_limit_exceeded", status=429,
                               kind="rate_limit_error")
        return req

    def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
        """Once streaming has begun the status is sent; report a failure as a last event instead."""
        try:
            async for event in events:
                yield event
        except Exception as e:
            logger.exception("generation failed")
            yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                                 "code": None}})

    ui = UI_PATH.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(ui, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": True, "model": model_id, "device": str(worker.device),
                "busy": worker.stats["requests_active"] > 0, "auth": bool(config.api_key)}

    @app.get("/stats")
    async def stats(request: Request):
        authorize(request)
        return {**worker.stats, "uptime_s": round(time.time() - started, 1), "model": model_id,
                "device": str(worker.device), "model_config": dict(vars(model.config)),
                "defaults": {"temperature": config.temperature, "top_k": config.top_k, "max_tokens": config.max_tokens}}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(started),
                                            "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat(request: Request):
        gen = Generation(worker, await read_chat_request(request, openai=False))

        async def events() -> AsyncIterator[str]:
            async for delta in text_deltas(gen, tokenizer):
                yield sse({"token": delta})
            yield sse({"done": True})

        return event_stream(stream_errors(events()))

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request):
        req = await read_chat_request(request, openai=True)
        gen = Generation(worker, req)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_id}

        def usage() -> dict:
            return {"prompt_tokens": len(req.prompt), "completion_tokens": len(gen.tokens),
                    "total_tokens": len(req.prompt) + len(gen.tokens)}

        if not req.stream:
            tokens = await gen.collect(request)
            message = {"role": "assistant", "content": tokenizer.decode(tokens)}
            return {**head, "object": "chat.completion", "usage": usage(),
                    "choices": [{"index": 0, "message": message, "finish_reason": gen.finish_reason}]}

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            async for delta in text_deltas(gen, tokenizer):
                yield chunk({"content": delta})
            yield chunk({}, gen.finish_reason)
            if req.include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return event_stream(stream_errors(events()))

    return app


# -----------------------------------------------------------------------------
# command line

def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from nanochat_core.checkpoint import load_model
    from nanochat_core.common import autodetect_device_type
    from nanochat_core.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="python -m nanochat_core.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (model.pt + meta.json)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    add_config_arguments(parser, ServeConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = config_from_args(ServeConfig, args)
        if not config.api_key and os.environ.get("NANOCHAT_API_KEY"):
            config = ServeConfig(**{**vars(config), "api_key": os.environ["NANOCHAT_API_KEY"]})
        device = torch.device(config.device_type or autodetect_device_type())
        model, _ = load_model(args.model, device)
        app = create_app(model, Tokenizer.load(args.tokenizer), config)
    except (ValueError, RuntimeError, OSError) as e:  # ConfigError, CheckpointError, TokenizerError, ...
        sys.exit(f"nanochat server: error: {e}")
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        logger.warning(f"serving on {config.host} without an API key: anyone who can reach it can use the model")
    logger.info(f"serving {args.model} on {device} at http://{config.host}:{config.port}")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


if __name__ == "__main__":
    main()
