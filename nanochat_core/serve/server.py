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
422 or a 5xx (the openai client retries those); see chat_request.py, which also bounds every field that costs
work. A body over 1 MiB gets 413; a request whose headers and body do not arrive within --request-timeout
seconds (30) gets 408 and its connection closed. Requests are decoded together: each model replica (one per
GPU) runs a continuous-batching loop on its own thread (batching.py), and each token is decoded and checked
against the stop strings on that thread too, so the event loop keeps answering /health and streaming while
they work. A client that disconnects, queued or generating, frees its batch slot before the next decode step.
With --api-key (or $NANOCHAT_API_KEY) every endpoint except / and /health wants `Authorization: Bearer KEY`.
`--port 0` picks a free port; the URL logged once the server listens has the real one (ChatServer.port/.url).
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
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from nanochat_core.config import ConfigError, add_config_arguments, config_from_args
from nanochat_core.engine import IncrementalDecoder
from nanochat_core.serve.batching import Job, Replica, Router, build_router
from nanochat_core.serve.chat_request import ChatRequest, RequestError, StopText, parse_chat_request
from nanochat_core.tokenizer import SPECIAL_TOKENS

logger = logging.getLogger("nanochat.server")

MAX_BODY_BYTES = 1 << 20  # larger bodies get 413
MAX_DRAIN_BYTES = 64 << 20  # a refused body is read (and dropped) up to this much, so that the client gets the 413
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
    request_timeout: float = 30.0  # s for a request's headers and body to arrive; then 408 and the connection closes

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"ServeConfig.port: {self.port} is not a TCP port (0-65535; 0 = any free port)")
        if not 0 < self.request_timeout <= 3600:
            raise ConfigError(f"ServeConfig.request_timeout must be in (0, 3600] seconds, got {self.request_timeout}")
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


class ChoiceText:
    """A choice's text as deltas: whole UTF-8 characters only, no special tokens (the calculator's
    <|python_start|> ... <|output_end|> markers among them), and nothing from its first stop string on."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.decoder, self.stops, self.ended = IncrementalDecoder(tokenizer), StopText(stops), False
        self.specials = {tokenizer.encode_special(name) for name in SPECIAL_TOKENS}

    def push(self, token: int) -> str:
        return "" if token in self.specials else self.stops.push(self.decoder.push(token))

    def flush(self) -> str:
        return self.stops.push(self.decoder.flush()) + self.stops.flush()


class Generation:
    """One request's n choices, each a Job on the least busy replica. Each token is decoded and checked against
    the stop strings on the replica's thread (ChoiceText), so the per-token work stays off the event loop; the
    loop gets text deltas, with one wake-up per burst (Mailbox)."""

    def __init__(self, router: Router, req: ChatRequest, tokenizer):
        self.router, self.req, self.tokenizer = router, req, tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(req.n)]  # each choice's, up to a stop string
        self.finish_reasons: list[str | None] = [None] * req.n
        self.placed: list[tuple[Job, Replica]] = []

    def _emitter(self, box: Mailbox, inbox: Inbox, i: int, job: Job):
        text = ChoiceText(self.tokenizer, self.req.stop)

        def emit(kind: str, value) -> None:  # on the replica's thread, between its decode steps
            if text.ended:  # stopped by a stop string; late events
                return
            if kind == "token":
                self.tokens[i].append(value)
                events = [(i, "text", text.push(value))]
                if text.stops.stopped:  # end the choice; its row leaves before the next step (we are that thread)
                    job.cancelled, text.ended = "requests_served", True
                    events.append((i, "done", "stop"))
            elif kind == "done":
                text.ended = True
                events = [(i, "text", text.flush()), (i, "done", value)]
            else:
                events = [(i, kind, value)]
            try:
                for event in events:
                    if event[1] != "text" or event[2]:
                        box.put(inbox, event)
            except RuntimeError:  # the event loop is gone (shutdown): stop generating
                job.cancelled = "requests_disconnected"
        return emit

    async def deltas(self) -> AsyncIterator[list[tuple[int, str | None]]]:
        """Per burst of events: (choice, text delta) for each choice whose text grew, then (choice, None) for each
        choice that ended (at its stop token, max_tokens or a stop string; see finish_reasons). A busy server
        sends fewer, larger chunks. Leaving early (the client went away) cancels the choices still running."""
        box, inbox, req = mailbox(), Inbox(), self.req
        started = time.perf_counter()
        for i in range(req.n):
            job = Job(req.prompt, req.max_tokens, req.temperature, req.top_k, req.top_p, (req.seed + i) % 2**63)
            job.emit = self._emitter(box, inbox, i, job)
            self.placed.append((job, self.router.submit(job)))
        try:
            while None in self.finish_reasons:
                grown: dict[int, str] = {}
                ended = []
                for i, kind, value in await inbox.get_all():
                    if kind == "error":
                        raise value
                    if kind == "done":
                        self.finish_reasons[i] = value
                        ended.append(i)
                    else:
                        grown[i] = grown.get(i, "") + value
                yield list(grown.items()) + [(i, None) for i in ended]
        finally:
            for (job, replica), reason in zip(self.placed, self.finish_reasons, strict=True):
                if reason is None:
                    replica.cancel(job)
            reasons = ", ".join(r or "cancelled" for r in self.finish_reasons)
            logger.info(f"prompt {len(req.prompt)} tok, generated {sum(map(len, self.tokens))} tok in "
                        f"{time.perf_counter() - started:.2f}s ({reasons})")


async def collect(gen: Generation, request: Request) -> list[str]:
    """Every choice's whole text (no streaming); stops early, freeing the rows, if the client disconnects."""
    texts = [""] * gen.req.n

    async def consume() -> None:
        async for batch in gen.deltas():
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
        given = request.headers.get("authorization", "").encode("latin-1")  # the bytes sent (Starlette decodes
        # header values as Latin-1); a non-ASCII key is compared as the UTF-8 bytes a client sends for it
        if not hmac.compare_digest(given, f"Bearer {config.api_key}".encode()):
            raise RequestError("missing or incorrect API key (send Authorization: Bearer KEY)", None,
                               "invalid_api_key", status=401)

    async def read_chat_request(request: Request, openai: bool) -> ChatRequest:
        authorize(request)
        try:
            raw = await read_body(request)
        except ClientDisconnect:  # gone (or timed out: RequestDeadline) before the body was in; nobody to answer
            raise RequestError("the client disconnected before sending the whole body", status=400) from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or nesting deep enough to blow the stack
            raise RequestError(f"could not parse the JSON body: {e}") from None
        req = parse_chat_request(body, tokenizer, seq_len, config, openai)
        if sum(len(r.pending) for r in router.replicas) >= MAX_QUEUED:
            raise RequestError("the server is busy; try again shortly", None, "rate_limit_exceeded", status=429,
                               kind="rate_limit_error")
        return req

    async def read_body(request: Request) -> bytes:
        """The body, read in pieces so that one too large is refused (413) before it is all in memory. A refused
        body is still read to its end (and dropped, up to MAX_DRAIN_BYTES): a server that closes a connection
        with data unread resets it, and the client loses the reply."""
        pieces, raw = request.stream(), bytearray()
        declared = request.headers.get("content-length", "")
        if not (declared.isdigit() and int(declared) > MAX_BODY_BYTES):
            async for piece in pieces:
                raw += piece
                if len(raw) > MAX_BODY_BYTES:
                    break
            else:
                return bytes(raw)
        if request.headers.get("expect", "").lower() != "100-continue":  # else the client waits for our answer
            read = len(raw)
            async for piece in pieces:
                read += len(piece)
                if read > MAX_DRAIN_BYTES:
                    break
        raise RequestError(f"the request body is larger than {MAX_BODY_BYTES} bytes", None, "request_too_large",
                           status=413)

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

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def index():
        return HTMLResponse(ui, headers={"Cache-Control": "no-cache"})

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        busy = any(r.rows for r in router.replicas)
        return {"status": "ok", "ready": True, "model": model_id, "device": devices,
                "replicas": len(router.replicas), "busy": busy, "auth": bool(config.api_key)}

    @app.api_route("/stats", methods=["GET", "HEAD"])
    async def stats(request: Request):
        authorize(request)
        return {**router.stats(), "uptime_s": round(time.time() - started, 1), "model": model_id,
                "device": devices, "model_config": dict(vars(model.config)),
                "defaults": {"temperature": config.temperature, "top_k": config.top_k, "max_tokens": config.max_tokens}}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(started),
                                            "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat(request: Request):
        gen = Generation(router, await read_chat_request(request, openai=False), tokenizer)

        async def events() -> AsyncIterator[str | bytes]:
            async for batch in gen.deltas():  # one write per batch: all its deltas
                out = "".join(f'data: {{"token": {text_json(delta)}}}\n\n' for _, delta in batch if delta)
                if out:
                    yield out.encode()
            yield sse({"done": True})

        return event_stream(events())

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request):
        req = await read_chat_request(request, openai=True)
        gen = Generation(router, req, tokenizer)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_id}

        def usage() -> dict:
            completion = sum(map(len, gen.tokens))
            return {"prompt_tokens": len(req.prompt), "completion_tokens": completion,
                    "total_tokens": len(req.prompt) + completion}

        if not req.stream:
            texts = await collect(gen, request)
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
            async for batch in gen.deltas():  # one write per batch: all its chunks
                if batch:
                    yield "".join(template.content(i, delta) if delta is not None else
                                  chunk(i, {}, gen.finish_reasons[i]) for i, delta in batch).encode()
            if req.include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return event_stream(events())

    return app


# -----------------------------------------------------------------------------
# the HTTP server

def server_url(host: str, port: int) -> str:
    """A URL for a server bound to host:port that works from this machine: an IPv6 address in brackets, and the
    loopback address for a wildcard one (0.0.0.0, ::), which no client can connect to."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": {"message": f"the request was not received within {seconds:g} s",
                                 "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (len(body), body))


class RequestDeadline:
    """Mixed into uvicorn's HTTP protocol (httptools or h11): a request's headers and body must arrive within
    `request_timeout` s of the connection opening or of the previous response ending; else 408 and close.
    uvicorn only times out idle keep-alive connections, so a client that sent half a request and went quiet
    held its connection open for good. Once a request is all in, the app may take as long as it needs."""

    request_timeout = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._request_deadline = None
        self._arm_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_deadline()  # the next request's turn

    def connection_lost(self, exc) -> None:
        if self._request_deadline is not None:
            self._request_deadline.cancel()
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        if self._request_deadline is not None:
            self._request_deadline.cancel()
        self._request_deadline = self.loop.call_later(self.request_timeout, self._request_timed_out)

    def _request_timed_out(self) -> None:
        self._request_deadline = None
        cycle = self.cycle  # the latest request: None before the first one's headers are in
        if self.transport.is_closing() or (cycle is not None and not cycle.response_complete and not cycle.more_body):
            return  # closed, or the request is in and being answered (the deadline is armed again after it)
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_timeout_response(self.request_timeout))
        self.transport.close()  # a body being read: the app's receive() says the client disconnected


class ChatServer(uvicorn.Server):
    """uvicorn serving `app` as `config` says (host, port, request_timeout), with uvloop and httptools when
    installed. Once it listens (`started`), `port` is the bound port (the free one picked for port 0) and `url`
    a URL for it; both are logged."""

    def __init__(self, app, config: ServeConfig, log_level: str = "info"):
        config.validate()
        # uvloop and httptools (uvicorn[standard]): a cheaper event loop and HTTP parser, which matters here
        # because every streamed token is a write on the loop that shares the GIL with decoding
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        if importlib.util.find_spec("httptools"):
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        else:
            from uvicorn.protocols.http.h11_impl import H11Protocol as base
        protocol = type("NanochatHTTP", (RequestDeadline, base), {"request_timeout": config.request_timeout})
        super().__init__(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, loop=loop,
                                        http=protocol))
        self.host, self.port = config.host, config.port

    @property
    def url(self) -> str:
        return server_url(self.host, self.port)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            self.port = self.servers[0].sockets[0].getsockname()[1]
            where = f" (listening on all interfaces: {self.host})" if self.host in ("", "0.0.0.0", "::") else ""
            logger.info(f"serving at {self.url}{where}")


# -----------------------------------------------------------------------------
# command line

def main(argv: list[str] | None = None) -> None:
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
    server = ChatServer(app, config)
    logger.info(f"loaded {args.model}: {len(replicas)} replica(s) on {', '.join(str(r.device) for r in replicas)}, "
                f"up to {config.max_batch} rows each; event loop {server.config.loop}")
    server.run()


if __name__ == "__main__":
    main()
