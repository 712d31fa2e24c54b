"""The chat server: a web UI, nanochat's streaming API and an OpenAI-compatible API over one model.

    python -m nanochat_core.serve --model DIR --tokenizer DIR [--host 127.0.0.1] [--port 8000]
        [--temperature 0.8] [--top-k 50] [--max-tokens 512] [--device-type cuda|cpu|mps] [--api-key KEY]
        [--num-replicas 0] [--max-batch 32]

GET /                       the chat UI (ui.html)
GET /health                 {"status": "ok", "ready": true, ...} (no API key needed)
GET /stats                  request, token and tokens/s counters, queue depth; in all and per replica
POST /chat/completions      nanochat's SSE stream: data: {"token": "..."} ... data: {"done": true}
POST /v1/chat/completions   OpenAI chat completions (stream or not, n choices, stop strings); GET /v1/models

Bad requests get status 400 with OpenAI's error shape ({"error": {message, type, param, code}}), never a
422 or a 5xx (the openai client retries those); see chat_request.py. Requests are decoded together: each
model replica (one per GPU) runs a continuous-batching loop on its own thread (batching.py), so the event
loop keeps answering /health and streaming while it works. A client that disconnects, queued or
generating, frees its batch slot before the next decode step. With --api-key (or $NANOCHAT_API_KEY)
every endpoint except / and /health wants `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import importlib.util
import json
import logging
import os
import secrets
import sys
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.exceptions import HTTPException

from nanochat_core.config import ConfigError, add_config_arguments, config_from_args
from nanochat_core.engine import IncrementalDecoder
from nanochat_core.serve.batching import Job, Replica, Router, build_router
from nanochat_core.serve.chat_request import ChatRequest, RequestError, StopText, parse_chat_request

logger = logging.getLogger("nanochat.server")

MAX_BODY_BYTES = 1 << 20
MAX_QUEUED = 64  # jobs waiting for a batch slot (on all replicas) beyond this get 429
UI_PATH = Path(__file__).with_name("ui.html")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    temperature: float = 0.8  # defaults for requests that do not say
    top_k: int = 50
    max_tokens: int = 512
    device_type: str = ""  # "" = autodetect (cuda > mps > cpu)
    api_key: str = ""  # "" = no authentication
    num_replicas: int = 0  # model replicas; 0 = one per GPU on CUDA, 1 elsewhere
    max_batch: int = 32  # rows one replica decodes together; more wait in its queue
    cuda_graphs: bool = True  # on CUDA, replay each decode step from a CUDA graph (batching.GraphDecoder)

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
        if not 0 <= self.num_replicas <= 64:
            raise ConfigError(f"ServeConfig.num_replicas must be in [0, 64] (0 = one per GPU), got {self.num_replicas}")
        if not 1 <= self.max_batch <= 1024:
            raise ConfigError(f"ServeConfig.max_batch must be in [1, 1024], got {self.max_batch}")


# -----------------------------------------------------------------------------
# generation: requests become jobs on the replicas' decode loops

class Mailbox:
    """Events from the decode threads to one event loop, with one wake-up per burst rather than per token.

    A decode step emits a token for each of its rows back to back; the first event of a burst schedules one
    delivery on the loop (call_soon_threadsafe: a lock and a write to the loop's wake-up pipe), the rest are
    appended to a deque. The delivery hands every event to its inbox and wakes each inbox's reader once. No
    lock: deque appends are atomic, and `scheduled` is cleared before the deque is drained, so an event
    appended after the drain started schedules a delivery of its own."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.events, self.scheduled = loop, deque(), False

    def put(self, inbox: Inbox, event: tuple) -> None:  # on any thread; RuntimeError once the loop is closed
        self.events.append((inbox, event))
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                self.scheduled = False
                raise

    def _deliver(self) -> None:
        self.scheduled = False
        woken = set()
        while self.events:
            inbox, event = self.events.popleft()
            inbox.items.append(event)
            woken.add(inbox)
        for inbox in woken:
            inbox.ready.set()


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()


def mailbox() -> Mailbox:
    """The running event loop's Mailbox."""
    loop = asyncio.get_running_loop()
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = Mailbox(loop)
    return box


class Inbox:
    """One request's events, filled on its event loop by Mailbox deliveries."""

    def __init__(self):
        self.items: deque = deque()
        self.ready = asyncio.Event()

    async def get_all(self) -> list:
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        items = list(self.items)
        self.items.clear()
        return items


class Generation:
    """One request's n choices, each a Job on the least busy replica; their events come back to this event loop."""

    def __init__(self, router: Router, req: ChatRequest):
        self.router, self.req = router, req
        self.tokens: list[list[int]] = [[] for _ in range(req.n)]  # each choice's, up to a stop string
        self.finish_reasons: list[str | None] = [None] * req.n
        self.placed: list[tuple[Job, Replica]] = []

    def stop(self, i: int) -> None:
        """End choice i now (its text reached a stop string); its batch slot is freed."""
        job, replica = self.placed[i]
        replica.cancel(job, "requests_served")
        self.finish_reasons[i] = "stop"

    async def stream(self) -> AsyncIterator[list[tuple[int, int | None]]]:
        """Lists of (choice, token) as tokens arrive, with (choice, None) when a choice ends (see finish_reasons).
        Each list holds all that arrived since the last, so a busy server sends fewer, larger chunks. Leaving
        early (the client went away) cancels the choices still running."""
        box, inbox, req = mailbox(), Inbox(), self.req

        def emitter(i: int, job: Job):
            def emit(kind: str, value) -> None:  # on a replica's thread
                try:
                    box.put(inbox, (i, kind, value))
                except RuntimeError:  # the event loop is gone (shutdown): stop generating
                    job.cancelled = "requests_disconnected"
            return emit

        started = time.perf_counter()
        for i in range(req.n):
            job = Job(req.prompt, req.max_tokens, req.temperature, req.top_k, req.top_p, (req.seed + i) % 2**63)
            job.emit = emitter(i, job)
            self.placed.append((job, self.router.submit(job)))
        try:
            while None in self.finish_reasons:
                batch = []
                for i, kind, value in await inbox.get_all():
                    if self.finish_reasons[i] is not None:  # ended by a stop string; late events
                        continue
                    if kind == "error":
                        raise value
                    if kind == "done":
                        self.finish_reasons[i] = value
                    batch.append((i, value if kind == "token" else None))
                yield batch
        finally:
            for (job, replica), reason in zip(self.placed, self.finish_reasons, strict=True):
                if reason is None:
                    replica.cancel(job)
            reasons = ", ".join(r or "cancelled" for r in self.finish_reasons)
            logger.info(f"prompt {len(req.prompt)} tok, generated {sum(map(len, self.tokens))} tok in "
                        f"{time.perf_counter() - started:.2f}s ({reasons})")


class ChoiceText:
    """A choice's text as deltas: whole UTF-8 characters only, and nothing from its first stop string on."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.decoder, self.stops, self.ended = IncrementalDecoder(tokenizer), StopText(stops), False

    def push(self, token: int) -> str:
        return self.stops.push(self.decoder.push(token))

    def flush(self) -> str:
        return self.stops.push(self.decoder.flush()) + self.stops.flush()


async def text_deltas(gen: Generation, tokenizer) -> AsyncIterator[list[tuple[int, str | None]]]:
    """Per batch of tokens: (choice, text delta) for each choice whose text grew, then (choice, None) for each
    choice that ended (at its stop token, max_tokens or a stop string). Counts each choice's tokens."""
    texts = [ChoiceText(tokenizer, gen.req.stop) for _ in range(gen.req.n)]
    async for events in gen.stream():
        grown: dict[int, str] = {}
        ended = []
        for i, token in events:
            text = texts[i]
            if text.ended:  # stopped by a stop string earlier in this batch
                continue
            if token is None:
                delta, text.ended = text.flush(), True
            else:
                gen.tokens[i].append(token)
                delta = text.push(token)
                if text.stops.stopped:
                    gen.stop(i)
                    text.ended = True
            grown[i] = grown.get(i, "") + delta
            if text.ended:
                ended.append(i)
        yield [(i, delta) for i, delta in grown.items() if delta] + [(i, None) for i in ended]


async def collect(gen: Generation, tokenizer, request: Request) -> list[str]:
    """Every choice's whole text (no streaming); stops early, freeing the rows, if the client disconnects."""
    texts = [""] * gen.req.n

    async def consume() -> None:
        async for batch in text_deltas(gen, tokenizer):
            for i, delta in batch:
                texts[i] += delta or ""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    consumer, watcher = asyncio.create_task(consume()), asyncio.create_task(watch())
    try:
        await asyncio.wait([consumer, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():  # the client left: cancelling the consumer cancels its jobs
            consumer.cancel()
    await asyncio.wait([consumer])
    if not consumer.cancelled() and consumer.exception() is not None:
        raise consumer.exception()
    return texts


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def text_json(text: str) -> str:
    """json.dumps(text, ensure_ascii=False), as sse() writes a string."""
    return json.dumps(text, ensure_ascii=False)


class ChunkTemplate:
    """A streamed OpenAI chunk with one choice's content delta, as sse() writes it (the same bytes), from a
    prefix rendered once per request: a chunk per token is a string join, not a dict and a json.dumps."""

    def __init__(self, head: dict):
        opening = sse({**head, "object": "chat.completion.chunk", "choices": []})
        self.prefix = opening[:opening.rindex("[]")] + '[{"index": '  # data: {..., "choices": [{"index":

    def content(self, i: int, delta: str) -> str:
        return f'{self.prefix}{i}, "delta": {{"content": {text_json(delta)}}}, "finish_reason": null}}]}}\n\n'


# -----------------------------------------------------------------------------
# the app

def create_app(model, tokenizer, config: ServeConfig | None = None) -> FastAPI:
    """The app over `model` (replicated as config.num_replicas says); its decode threads stop at shutdown."""
    config = config or ServeConfig()
    config.validate()
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.get_vocab_size()} exceeds the model's {model.config.vocab_size}")
    router = build_router(model, tokenizer, config.num_replicas, config.max_batch, config.cuda_graphs)
    seq_len = model.config.sequence_len
    model_id = f"nanochat-d{model.config.n_layer}"
    devices = ", ".join(dict.fromkeys(str(r.device) for r in router.replicas))
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await asyncio.to_thread(router.close)

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.router = router

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
        if sum(len(r.pending) for r in router.replicas) >= MAX_QUEUED:
            raise RequestError("the server is busy; try again shortly", None, "rate_limit_exceeded", status=429,
                               kind="rate_limit_error")
        return req

    def event_stream(events: AsyncIterator[str | bytes]) -> StreamingResponse:
        return StreamingResponse(stream_errors(events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_errors(events: AsyncIterator[str | bytes]) -> AsyncIterator[str | bytes]:
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
        busy = any(r.rows for r in router.replicas)
        return {"status": "ok", "ready": True, "model": model_id, "device": devices,
                "replicas": len(router.replicas), "busy": busy, "auth": bool(config.api_key)}

    @app.get("/stats")
    async def stats(request: Request):
        authorize(request)
        return {**router.stats(), "uptime_s": round(time.time() - started, 1), "model": model_id,
                "device": devices, "model_config": dict(vars(model.config)),
                "defaults": {"temperature": config.temperature, "top_k": config.top_k, "max_tokens": config.max_tokens}}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(started),
                                            "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat(request: Request):
        gen = Generation(router, await read_chat_request(request, openai=False))

        async def events() -> AsyncIterator[str | bytes]:
            async for batch in text_deltas(gen, tokenizer):  # one write per batch: all its deltas
                out = "".join(f'data: {{"token": {text_json(delta)}}}\n\n' for _, delta in batch if delta)
                if out:
                    yield out.encode()
            yield sse({"done": True})

        return event_stream(events())

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request):
        req = await read_chat_request(request, openai=True)
        gen = Generation(router, req)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_id}

        def usage() -> dict:
            completion = sum(map(len, gen.tokens))
            return {"prompt_tokens": len(req.prompt), "completion_tokens": completion,
                    "total_tokens": len(req.prompt) + completion}

        if not req.stream:
            texts = await collect(gen, tokenizer, request)
            choices = [{"index": i, "message": {"role": "assistant", "content": text},
                        "finish_reason": gen.finish_reasons[i]} for i, text in enumerate(texts)]
            return {**head, "object": "chat.completion", "usage": usage(), "choices": choices}

        def chunk(i: int, delta: dict, finish_reason: str | None = None) -> str:
            choice = {"index": i, "delta": delta, "finish_reason": finish_reason}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

        template = ChunkTemplate(head)

        async def events() -> AsyncIterator[str | bytes]:
            for i in range(req.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for batch in text_deltas(gen, tokenizer):  # one write per batch: all its chunks
                if batch:
                    yield "".join(template.content(i, delta) if delta is not None else
                                  chunk(i, {}, gen.finish_reasons[i]) for i, delta in batch).encode()
            if req.include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return event_stream(events())

    return app


# -----------------------------------------------------------------------------
# command line

def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from nanochat_core.checkpoint import load_model
    from nanochat_core.common import autodetect_device_type
    from nanochat_core.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="python -m nanochat_core.serve", description=__doc__,
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
    replicas = app.state.router.replicas
    logger.info(f"serving {args.model} at http://{config.host}:{config.port} with {len(replicas)} replica(s) on "
                f"{', '.join(str(r.device) for r in replicas)}, up to {config.max_batch} rows each")
    # uvloop and httptools (uvicorn[standard]) when installed: a cheaper event loop and HTTP parser, which
    # matters here because every streamed token is a write on the loop that shares the GIL with decoding
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    logger.info(f"event loop {loop}, HTTP parser {http}")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", loop=loop, http=http)


if __name__ == "__main__":
    main()
