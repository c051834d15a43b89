"""The HTTP API: OpenAI-compatible where it fits, on FastAPI (ASGI, served by uvicorn).

=====================================  ==========================================================================
``POST /v1/chat/completions``          the system message is the instruction, the one user message the input
``POST /v1/completions``               ``instruction`` beside ``prompt``
``POST /v1/adapters``                  ``instruction`` -> the adapter's content-hash id (generated and cached);
                                       ``"export": true`` also writes it in PEFT format (``--adapter_export_dir``)
``GET /v1/models``, ``/health``,       the served model; ``{"status": "ok"}`` (503 once the engine thread is
``/metrics``                           gone); Prometheus text
=====================================  ==========================================================================

Both completion endpoints take ``max_tokens``, ``temperature`` (0, the default, or under 1e-5: greedy), ``top_p``,
``seed``, ``stop`` (a string or up to 4), ``stream`` (server-sent events, ``data: [DONE]`` last) and the TAGI extensions
``adapter`` (instead of the instruction: the id of a cached adapter, from ``POST /v1/adapters`` or an answer's
``tagi.adapter``; 404 once evicted), ``condition`` (``task``: the instruction is a task definition, formatted as
training formats it; ``instance``: read as is) and ``ignore_eos`` (decode ``max_tokens`` tokens whatever comes, as
vLLM's: for benchmarks).
Answers carry ``usage`` and a ``tagi`` object (adapter id, cache hit or miss, instruction tokens).

Bad requests get a 4xx and the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``; the body is
parsed here (size, UTF-8, JSON, every field), never by the engine. A client that goes away cancels its request
(streaming: the next write fails; non-streaming: polled every ``DISCONNECT_POLL_S``): its row leaves the batch at
the next step.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tagi_ds.export.peft import CONDITIONS, export_peft
from tagi_ds.serve import engine as serve_engine
from tagi_ds.serve.scheduler import Scheduler

MAX_STOP = 4
SEED_LOW, SEED_HIGH = -(2**63), 2**64  # what torch.Generator.manual_seed takes
DRAIN_FACTOR = 64
DISCONNECT_POLL_S = 0.25  # how often a non-streaming answer checks that its client is still there


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Limits:
    max_tokens: int  # a request's default and most
    max_request_bytes: int
    max_queue: int = 0  # most requests waiting for a batch (more: 429); 0: no bound


# -- reading a request --------------------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> dict[str, Any]:
    raw = bytearray()
    seen = 0
    async for chunk in request.stream():
        # A body over the limit is still read (and dropped), up to DRAIN_FACTOR times the limit: answering 413
        # while the client is still sending would reach it as a broken pipe, not as the 413.
        seen += len(chunk)
        if seen <= limit:
            raw += chunk
        elif seen > DRAIN_FACTOR * limit:
            break
    if seen > limit:
        raise ApiError(
            413,
            f"request body is {'over ' if seen > DRAIN_FACTOR * limit else ''}{seen} bytes, more "
            f"than this server takes ({limit}; --max_request_bytes)",
            code="request_too_large",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {err.start})", code="invalid_encoding") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(
            400,
            f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
            code="invalid_json",
        ) from None
    except (ValueError, RecursionError) as err:  # an integer past Python's digit limit; nesting past the stack
        what = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(";")[0]
        raise ApiError(400, f"request body is not valid JSON here: {what}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    check_strings(body)
    return body


def check_strings(body: dict) -> None:
    """Every string of the body (keys too) encodes as UTF-8: JSON's ``\\ud800`` escapes decode to lone surrogates,
    which would fail deep in the engine (the adapter id's hash, the tokenizer) and take the batch with them."""
    todo: list[tuple[str, Any]] = [("", body)]  # a stack, not recursion: nesting is json.loads's depth, ~1000
    while todo:
        path, value = todo.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                name = f"{path}.{k}" if path else str(k)
                _utf8(k, name)
                todo.append((name, v))
        elif isinstance(value, list):
            todo += [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, str):
            _utf8(value, path)


def _utf8(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(
            400,
            f"{param!r} is not valid Unicode: a lone surrogate {text[err.start]!r} at character {err.start}",
            param=param,
            code="invalid_encoding",
        ) from None


def _text(body: dict, key: str, required: bool = True, allow_empty: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(400, f"missing required field {key!r}", param=key, code="missing_field")
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{key!r} must be a string, got {type(value).__name__}", param=key)
    if not allow_empty and not value.strip():
        raise ApiError(400, f"{key!r} is empty", param=key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{key!r} must be a number, got {type(value).__name__}", param=key)
    if isinstance(value, float) and not math.isfinite(value):  # json.loads reads NaN / Infinity; NaN passes < >
        raise ApiError(400, f"{key!r} must be a finite number, got {value}", param=key)
    if value < low or (low_open and value == low) or value > high:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"{key!r} must be in {span}, got {value}", param=key)
    return float(value)


def _int(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key!r} must be an integer, got {type(value).__name__}", param=key)
    return value


def decoding(body: dict, limits: Limits, served: str, max_key: str = "max_tokens") -> dict[str, Any]:
    """The decoding fields every completion endpoint shares, checked."""
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )
    key = max_key if body.get(max_key) is not None else "max_tokens"
    max_tokens = _int(body, key)
    if max_tokens is None:
        max_tokens = limits.max_tokens
    if max_tokens <= 0 or max_tokens > limits.max_tokens:
        raise ApiError(400, f"{key!r} must be in [1, {limits.max_tokens}] (--max_tokens), got {max_tokens}", param=key)
    n = _int(body, "n")
    if n is not None and n != 1:
        raise ApiError(400, f"'n' must be 1 (one answer per request), got {n}", param="n")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", param="stream")
    condition = body.get("condition", "task")
    if condition not in CONDITIONS:
        raise ApiError(400, f"'condition' must be one of {', '.join(CONDITIONS)}, got {condition!r}", param="condition")
    seed = _int(body, "seed")
    if seed is not None and not SEED_LOW <= seed < SEED_HIGH:
        raise ApiError(400, f"'seed' must be in [-2**63, 2**64) (a 64-bit seed), got {seed}", param="seed")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, f"'ignore_eos' must be true or false, got {ignore_eos!r}", param="ignore_eos")
    return {
        "ignore_eos": ignore_eos,
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "seed": seed,
        "stop": tuple(stop),
        "stream": stream,
        "condition": condition,
    }


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
    return content


def chat_texts(body: dict, by_id: bool = False) -> tuple[str, str]:
    """(instruction, input) from ``messages``: the system message(s) and the one user message (``by_id``: the
    request names its adapter, so it has no system message)."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "missing required field 'messages'", param="messages", code="missing_field")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of objects", param="messages")
    system, user = [], []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_content(m, i))
        elif role == "user":
            user.append(_content(m, i))
        else:
            raise ApiError(
                400,
                f"messages[{i}].role {role!r}: TAGI reads a system message (the instruction) and one "
                "user message (the input)",
                param=f"messages[{i}].role",
            )
    if by_id and system:
        raise ApiError(400, "'adapter' names the adapter: give no system message beside it", param="messages")
    if not by_id and (not system or not "\n\n".join(system).strip()):
        raise ApiError(
            400,
            "'messages' needs a non-empty system message: the instruction the adapter is generated "
            "from (or 'adapter': an id from POST /v1/adapters)",
            param="messages",
        )
    if len(user) != 1:
        raise ApiError(400, f"'messages' needs exactly one user message (the input), got {len(user)}", param="messages")
    return "\n\n".join(system), user[0]


# -- the app ------------------------------------------------------------------------------------------------------
def create_app(
    scheduler: Scheduler, served: str, limits: Limits, on_ready=None, export_dir: Path | None = None
) -> FastAPI:
    engine = scheduler.engine
    metrics = engine.metrics
    app = FastAPI(title="tagi-ds serve", docs_url=None, redoc_url=None, openapi_url=None)
    export_lock = threading.Lock()
    if on_ready is not None:
        app.router.on_startup.append(on_ready)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError):
        return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(
            error_body(str(err.detail), "invalid_request_error", None, code), status_code=err.status_code
        )

    class Count:
        """Counts every answer by endpoint and status. Plain ASGI, not ``@app.middleware("http")``: Starlette's
        BaseHTTPMiddleware wraps ``receive`` so that ``request.is_disconnected()`` never sees the client leave."""

        def __init__(self, inner) -> None:
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)

            async def counted(message):
                if message["type"] == "http.response.start":
                    path = scope["path"]
                    metrics.inc(
                        "requests_total", endpoint=path if path in KNOWN else "other", status=str(message["status"])
                    )
                await send(message)

            await self.inner(scope, receive, counted)

    app.add_middleware(Count)

    def admit() -> None:
        """Before a request is queued (and before a stream's status line): 503 once the engine thread is gone (it
        would never be answered), 429 while ``--max_queue`` requests wait already."""
        if not scheduler.alive:
            raise ApiError(
                503,
                f"the engine thread has stopped ({scheduler.failure!r}): this server answers no more "
                "completions; restart it",
                type_="server_error",
                code="engine_stopped",
            )
        if limits.max_queue and scheduler.waiting >= limits.max_queue:
            raise ApiError(
                429,
                f"{scheduler.waiting} requests are waiting already (--max_queue {limits.max_queue}): retry later",
                type_="rate_limit_error",
                code="queue_full",
            )

    async def run(req: serve_engine.Request, client: Request | None = None):
        """Queue ``req``; yield its events (``delta`` texts, then ``done`` or ``error``) as they come. ``client``
        (a non-streaming answer, which writes nothing until the end, so no failed write tells that the client
        left): polled while waiting; once it has gone, the request is cancelled and its row leaves the batch."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.emit = lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        scheduler.submit(req)
        done = False
        watcher = asyncio.ensure_future(watch(req, client)) if client is not None else None
        try:
            while True:
                kind, value = await events.get()
                if kind == "error":
                    done = True
                    raise ApiError(
                        500, f"the engine failed on this batch: {type(value).__name__}: {value}", type_="server_error"
                    )
                yield kind, value
                if kind == "done":
                    done = True
                    return
        finally:
            if watcher is not None:
                watcher.cancel()
            if not done:  # the client went away (or the response was cancelled): its row leaves the batch
                req.cancelled.set()

    async def watch(req: serve_engine.Request, client: Request) -> None:
        """Every DISCONNECT_POLL_S: once ``client`` has gone, ``req`` is cancelled (it still ends with its
        ``done``, ``finish_reason`` cancelled, which nobody reads)."""
        while not req.cancelled.is_set():
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await client.is_disconnected():
                req.cancelled.set()

    def named_adapter(body: dict):
        """The cached adapter a request names by id (``"adapter"``), or None when it sends its instruction."""
        ref = body.get("adapter")
        if ref is None:
            return None
        if not isinstance(ref, str):
            raise ApiError(400, f"'adapter' must be an adapter id string, got {type(ref).__name__}", param="adapter")
        if not engine.generates:
            raise ApiError(400, f"this server runs mode {engine.mode}: no adapters", param="adapter")
        adapter = engine.cache.get(ref)
        if adapter is None:
            raise ApiError(
                404,
                f"adapter {ref!r} is not cached (never made here, or evicted): send its instruction "
                "again, or POST /v1/adapters",
                param="adapter",
                code="adapter_not_found",
            )
        return adapter

    def make_request(instruction: str, prompt: str, d: dict, adapter=None) -> serve_engine.Request:
        return serve_engine.Request(
            instruction=instruction,
            prompt=prompt,
            condition=d["condition"],
            max_tokens=d["max_tokens"],
            temperature=d["temperature"],
            top_p=d["top_p"],
            seed=d["seed"],
            stop=d["stop"],
            ignore_eos=d["ignore_eos"],
            adapter=adapter,
            cache="hit" if adapter is not None else "",
        )

    def usage(result: dict) -> dict:
        return {
            "prompt_tokens": result["prompt_tokens"],
            "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        }

    def tagi(result: dict) -> dict:
        return {
            "adapter": result["adapter"],
            "cache": result["cache"],
            "instruction_tokens": result["instruction_tokens"],
        }

    async def answer(req: serve_engine.Request, d: dict, chat: bool, include_usage: bool, client: Request):
        admit()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": rid, "created": created, "model": served}
        if not d["stream"]:
            result = None
            async for kind, value in run(req, client):
                if kind == "done":
                    result = value
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": result["text"]}}
                if chat
                else {"index": 0, "text": result["text"], "logprobs": None}
            )
            choice["finish_reason"] = result["finish_reason"]
            return JSONResponse(
                {
                    **head,
                    "object": "chat.completion" if chat else "text_completion",
                    "choices": [choice],
                    "usage": usage(result),
                    "tagi": tagi(result),
                }
            )
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n"

        async def events():
            if chat:
                yield chunk(None, None, first=True)
            try:
                async for kind, value in run(req):
                    if kind == "delta":
                        yield chunk(value, None)
                    else:
                        yield chunk(None, value["finish_reason"])
                        if include_usage:
                            yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': usage(value), 'tagi': tagi(value)})}\n\n"  # noqa: E501
            except ApiError as err:  # the status line is gone already: the error is the last event
                yield f"data: {json.dumps(error_body(err.message, err.type, err.param, err.code))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def include_usage(body: dict) -> bool:
        options = body.get("stream_options") or {}
        return isinstance(options, dict) and bool(options.get("include_usage"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, limits.max_request_bytes)
        adapter = named_adapter(body)
        instruction, prompt = chat_texts(body, by_id=adapter is not None)
        d = decoding(body, limits, served, max_key="max_completion_tokens")
        return await answer(make_request(instruction, prompt, d, adapter), d, True, include_usage(body), request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, limits.max_request_bytes)
        adapter = named_adapter(body)
        if adapter is not None and body.get("instruction") is not None:
            raise ApiError(400, "give 'instruction' or 'adapter', not both", param="adapter")
        instruction = "" if adapter is not None else _text(body, "instruction")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if prompt is None:
            raise ApiError(400, "missing required field 'prompt'", param="prompt", code="missing_field")
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (or a list of one string)", param="prompt")
        d = decoding(body, limits, served)
        return await answer(make_request(instruction, prompt, d, adapter), d, False, include_usage(body), request)

    @app.post("/v1/adapters")
    async def adapters(request: Request):
        body = await read_json(request, limits.max_request_bytes)
        instruction = _text(body, "instruction")
        condition = body.get("condition", "task")
        if condition not in CONDITIONS:
            raise ApiError(
                400, f"'condition' must be one of {', '.join(CONDITIONS)}, got {condition!r}", param="condition"
            )
        export = body.get("export", False)
        if not isinstance(export, bool):
            raise ApiError(400, f"'export' must be true or false, got {export!r}", param="export")
        if export and export_dir is None:
            raise ApiError(
                400,
                "'export': this server was started without --adapter_export_dir",
                param="export",
                code="export_disabled",
            )
        if not engine.generates:
            raise ApiError(400, f"this server runs mode {engine.mode}: no adapters are generated", code="no_adapters")
        admit()
        req = serve_engine.Request(instruction=instruction, prompt="", condition=condition, adapter_only=True)
        result = None
        async for kind, value in run(req):
            if kind == "done":
                result = value
        a = result["adapter"]
        out = {
            "id": a.id,
            "object": "adapter",
            "model": served,
            "condition": condition,
            "instruction_tokens": a.instruction_tokens,
            "bytes": a.nbytes,
            "cached": result["cache"] == "hit",
        }
        if export:  # reads the cached factors only (no forward): off the engine thread, the file writes too
            provenance = {
                "condition": condition,
                "text": instruction,
                "adapter": a.id,
                "hypernet_fingerprint": engine.fingerprint,
            }

            def write() -> Path:
                with export_lock:  # export_peft's temp dir is named by the process: one export at a time
                    return export_peft(
                        export_dir / a.id, engine.model, a.factors, engine.cfg.model.model_name_or_path, provenance
                    )

            path = await asyncio.to_thread(write)
            out["peft_dir"] = str(path)
            out["fusion"] = engine.model.fusion  # true: the PEFT adapter alone omits the instruction fusion
        return out

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": served,
                    "object": "model",
                    "created": STARTED,
                    "owned_by": "tagi-ds",
                    "tagi": {"mode": engine.mode, "fingerprint": engine.fingerprint},
                }
            ],
        }

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "error", "error": repr(scheduler.failure)}, status_code=503)
        return {"status": "ok", "batches": scheduler.batches, "adapters_cached": len(engine.cache)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


STARTED = int(time.time())
KNOWN = {"/v1/chat/completions", "/v1/completions", "/v1/adapters", "/v1/models", "/health", "/metrics"}
