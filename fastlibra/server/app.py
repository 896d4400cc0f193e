"""`fastlibra serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `AsyncLLM`.

    HTTP handler (event loop)                          engine thread
      validate body (pydantic) ─► model -> adapter
      chat template -> text    ─► AsyncLLM.add_request ─► LLM.add_request (checks, queue)
      SSE / JSON  ◄──────────────  AsyncLLM.stream     ◄── LLM.step deltas
      client gone ─► stream closed ─► abort: blocks freed before the next step

`model` names the base model (its served name) or a registered adapter. Every error is
OpenAI's error JSON with a 4xx status naming the field; nothing a client sends should
make the server answer 500, and no error body carries a path of the server's own (the
model's and adapters' directories are cut to their last part). Prompts are rendered and
tokenised off the engine thread (long ones on a worker thread, not the event loop), and a body over
`max_request_bytes` is refused (413) before it is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastlibra import __version__
from fastlibra.cache import CacheError, RequestTooLarge, UnknownAdapter
from fastlibra.llm import (
    LLM,
    AsyncLLM,
    Delta,
    Output,
    PromptTooLong,
    RequestFailed,
    check_adapter_name,
)
from fastlibra.model.lora import AdapterLoadError
from fastlibra.model.sampling import MAX_SEED, SamplingParams, SamplingParamsError, TokenLogprobs
from fastlibra.server import protocol as P
from fastlibra.server.metrics import ServerMetrics
from fastlibra.server.tools import PARSER_OF_MODEL, ToolCalling, ToolError, ToolStream, call_id

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
log = logging.getLogger("fastlibra.server")


@dataclass
class ServerConfig:
    """What `fastlibra serve` takes; the engine's own settings are passed to `LLM`."""

    model_dir: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "fastlibra"
    device_memory: int | None = None
    host_memory: int | None = None
    api_key: str | None = None
    adapter_roots: tuple[Path, ...] = ()
    """Directories dynamic loading may read from; empty = dynamic loading off."""
    served_model_name: str | None = None
    """The base model's id in `model` fields (default: --model as given)."""
    dtype: str | None = None
    device: str | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    max_lora_rank: int = 256
    engine_args: dict = field(default_factory=dict)
    """More `LLM` keyword arguments (vLLM's engine arguments: max_loras, max_model_len,
    swap_space, seed, ...); they win over the fields above."""
    chat_template: str | None = None
    """A Jinja chat template used instead of the tokenizer's."""
    model_aliases: tuple[str, ...] = ()
    """More ids for the base model (vLLM's further --served-model-name values)."""
    adapter_parents: dict[str, str] = field(default_factory=dict)
    """An adapter's `parent` in /v1/models (vLLM's base_model_name); default the base id."""
    uvicorn_log_level: str = "warning"
    metrics_compat: str | None = None
    """Also export another server's metric names on /metrics ("vllm")."""
    tool_call_parser: str | None = None
    """How `tool_choice: auto` output is parsed (hermes, llama3_json); default by the
    model's type (tools.PARSER_OF_MODEL)."""
    max_request_bytes: int = 8 * 2**20
    """Request bodies above this are refused (413) before they are read on: 8 MiB holds
    a 128k-token prompt as text or as token ids with room to spare."""
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        for name in self.adapters:
            check_name(name, self)

    @property
    def model_name(self) -> str:
        return self.served_model_name or str(self.model_dir)

    def private_dirs(self) -> list[str]:
        """Directories of this server whose paths error bodies must not show: the
        model's, the adapter roots and the startup adapters' parents (as given and
        resolved), longest first."""
        dirs = [self.model_dir.parent, *self.adapter_roots,
                *(p.parent for p in self.adapters.values())]
        out = {str(d) for d in dirs} | {str(d.resolve()) for d in dirs}
        return sorted((d for d in out if d not in ("", ".", "/")), key=len, reverse=True)

    def make_llm(self) -> LLM:
        kw = dict(device_memory=self.device_memory, host_memory=self.host_memory,
                  policy=self.policy, dtype=self.dtype, device=self.device,
                  block_size=self.block_size, max_num_seqs=self.max_num_seqs,
                  max_num_batched_tokens=self.max_batched_tokens,
                  max_lora_rank=self.max_lora_rank, max_model_len=self.max_model_len,
                  gpu_memory_utilization=self.gpu_memory_utilization) | self.engine_args
        llm = LLM(self.model_dir, dict(self.adapters), **kw)
        if self.chat_template is not None:
            if llm.tokenizer is None:
                raise ValueError(f"--chat-template: {self.model_dir} has no tokenizer files")
            llm.tokenizer.chat_template = self.chat_template
        return llm


def check_name(name: str, cfg: ServerConfig) -> None:
    """The engine's rules (length, printable), and not a name of the base model: an
    adapter called that would be listed and never reachable."""
    check_adapter_name(name)
    if name in (cfg.model_name, str(cfg.model_dir)):
        raise ValueError(f"adapter name {name!r} is the served model's name or path")


def check_api_key(api_key: str | None, authorization: str) -> None:
    """A 401 unless the Authorization header is `Bearer <api_key>` (no key: all pass)."""
    if api_key is not None and not hmac.compare_digest(authorization.encode(),
                                                       f"Bearer {api_key}".encode()):
        raise P.ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                         type="authentication_error", code="invalid_api_key")


# -- errors ----------------------------------------------------------------------------
def _error(status: int, message: str, param: str | None = None,
           type: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(P.ApiError(status, message, param, type, code).body(), status_code=status)


def _as_api_error(e: Exception, prompt_field: str) -> P.ApiError:
    """The engine's exceptions in OpenAI's terms (status, field)."""
    if isinstance(e, P.ApiError):
        return e
    if isinstance(e, UnknownAdapter):
        return P.ApiError(404, str(e), "model", code="model_not_found")
    if isinstance(e, PromptTooLong):
        return P.ApiError(400, str(e), prompt_field, code="context_length_exceeded")
    if isinstance(e, RequestTooLarge):
        return P.ApiError(400, str(e), "max_tokens")
    if isinstance(e, SamplingParamsError):
        return P.ApiError(400, str(e), e.field)
    if isinstance(e, AdapterLoadError):
        return P.ApiError(400, str(e), "lora_path")
    if isinstance(e, ValueError):  # token ids outside the vocabulary, empty prompt, ...
        return P.ApiError(400, str(e), prompt_field)
    if isinstance(e, RequestFailed):  # this request alone failed inside a step
        if e.adapter is not None:  # the adapter named in `model` is at fault
            return P.ApiError(400, str(e), "model", code="adapter_failed")
        return P.ApiError(500, str(e), type="internal_error")
    raise e


def _redact(message: str, private: list[str]) -> str:
    """`message` without the server's own directories (each cut to its last part)."""
    for d in private:
        message = message.replace(d + "/", "")
    return message


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid')}"
                  + (f" ({len(errors) - 1} more)" if len(errors) > 1 else ""), param)


# -- adapter paths ---------------------------------------------------------------------
def resolve_adapter_path(raw: str, roots: tuple[Path, ...]) -> Path:
    """The real directory for a dynamic load, only if it lies under an allowed root after
    following symlinks (the directory's and its files'); `..` is refused outright."""
    if not roots:
        raise P.ApiError(403, "dynamic adapter loading is off; start the server with "
                         "--adapter-root DIR to allow loading adapters from DIR",
                         "lora_path", type="permission_error")
    path = Path(raw)
    if ".." in path.parts or "\0" in raw:
        raise P.ApiError(403, f"lora_path {raw!r}: '..' is not allowed", "lora_path",
                         type="permission_error")
    real_roots = [r.resolve() for r in roots]
    candidates = [path] if path.is_absolute() else [r / path for r in real_roots]
    for cand in candidates:
        real = cand.resolve()
        if not any(real.is_relative_to(r) for r in real_roots):
            continue
        files = [real / f for f in ADAPTER_FILES if (real / f).exists()]
        if all(any(f.resolve().is_relative_to(r) for r in real_roots) for f in files):
            return real
    raise P.ApiError(403, f"lora_path {raw!r} is not under an allowed adapter root",
                     "lora_path", type="permission_error")


# -- the app ---------------------------------------------------------------------------
def build_app(engine: AsyncLLM, cfg: ServerConfig) -> FastAPI:
    llm = engine.llm
    metrics = ServerMetrics(engine, cfg.model_name, cfg.metrics_compat)
    app = FastAPI(title="FastLibra", summary="OpenAI-compatible multi-LoRA serving",
                  version="0.1.0")
    app.state.engine = engine
    app.state.metrics = metrics
    private = cfg.private_dirs()
    app.add_middleware(_BodyLimit, max_bytes=cfg.max_request_bytes)

    def error_body(e: P.ApiError) -> dict:
        return P.ApiError(e.status, _redact(e.message, private), e.param, e.type,
                          e.code).body()

    @app.exception_handler(P.ApiError)
    async def api_error(_: Request, e: P.ApiError):
        return JSONResponse(error_body(e), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        return _validation_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), type="not_found_error"
                      if e.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception):
        log.error("internal error", exc_info=e)
        return _error(500, _redact(f"internal error: {type(e).__name__}: {e}", private),
                      type="internal_error")

    async def check_key(request: Request) -> None:
        check_api_key(cfg.api_key, request.headers.get("authorization", ""))

    auth = [Depends(check_key)]
    tool_parser = cfg.tool_call_parser or PARSER_OF_MODEL.get(llm.model_config.arch, "hermes")

    def adapter_for(model: str) -> str | None:
        return None if model in (cfg.model_name, str(cfg.model_dir), *cfg.model_aliases) \
            else model

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error(503, "the engine thread has stopped", type="internal_error")
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    async def check_model(model: str | None) -> None:
        if model is not None and adapter_for(model) is not None \
                and model not in await engine.run(lambda: llm.adapter_names):
            raise P.ApiError(404, f"the model '{model}' does not exist", "model",
                             code="model_not_found")

    def tokenizer():
        if llm.tokenizer is None:
            raise P.ApiError(400, "this model directory has no tokenizer files", "model")
        return llm.tokenizer

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: P.TokenizeRequest):
        """vLLM's /tokenize: the ids a prompt (or chat) is served with."""
        await check_model(body.model)
        tok, conversation = tokenizer(), body.conversation()
        if conversation is None:
            text = body.prompt
        else:
            text = await asyncio.to_thread(_render_chat, llm, conversation,
                                           body.add_generation_prompt)
        ids = await asyncio.to_thread(tok.encode, text,
                                      add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": llm.max_model_len, "tokens": ids,
                "token_strs": tok.convert_ids_to_tokens(ids) if body.return_token_strs
                else None}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: P.DetokenizeRequest):
        await check_model(body.model)
        tok = tokenizer()
        vocab = llm.model_config.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise P.ApiError(400, f"tokens {bad[:4]} outside the vocabulary (0..{vocab - 1})",
                             "tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, body.tokens)}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        names = await engine.run(lambda: llm.adapter_names)
        now = int(time.time())
        base = {"id": cfg.model_name, "object": "model", "created": now,
                "owned_by": "fastlibra", "root": str(cfg.model_dir), "parent": None,
                "max_model_len": llm.max_model_len}
        return {"object": "list", "data": [base] + [
            {"id": n, "object": "model", "created": now, "owned_by": "fastlibra",
             "root": n, "parent": cfg.adapter_parents.get(n, cfg.model_name),
             "max_model_len": llm.max_model_len}
            for n in names]}

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_lora(body: P.LoadLoraRequest):
        try:
            check_name(body.lora_name, cfg)
        except ValueError as e:
            raise P.ApiError(400, str(e), "lora_name") from None
        path = resolve_adapter_path(body.lora_path, cfg.adapter_roots)
        try:
            await engine.run(llm.add_adapter, body.lora_name, path)
        except AdapterLoadError as e:
            raise P.ApiError(400, str(e), "lora_path") from None
        except CacheError as e:  # larger than the device pool could ever hold
            raise P.ApiError(400, f"{body.lora_path}: {e}", "lora_path") from None
        except ValueError as e:  # already loaded / being unloaded
            raise P.ApiError(400, str(e), "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_lora(body: P.UnloadLoraRequest):
        try:
            users = await engine.run(llm.remove_adapter, body.lora_name)
        except UnknownAdapter as e:
            raise P.ApiError(404, str(e), "lora_name", code="model_not_found") from None
        note = f" ({users} requests using it finish first)" if users else ""
        return PlainTextResponse(
            f"Success: LoRA adapter '{body.lora_name}' removed successfully.{note}")

    async def submit(prompts: list, adapter: str | None,
                     params: SamplingParams, n: int, prompt_field: str) -> list[str]:
        """Queue every (prompt, choice) pair or none: a failure aborts those queued.
        Text is tokenised here, on a worker thread, never on the engine thread."""
        rids: list[str] = []
        try:
            ids = [await _off_loop(llm.encode, p, size=len(p) if isinstance(p, str) else 0)
                   for p in prompts]
            for p in ids:
                for j in range(n):
                    sp = params
                    if n > 1 and params.seed is not None:
                        sp = replace(params, seed=params.seed + j)
                    rids.append(await engine.add_request(p, adapter, sp))
        except Exception as e:
            for rid in rids:
                engine.release(rid)
            raise _as_api_error(e, prompt_field) from None
        return rids

    @functools.lru_cache(maxsize=1 << 16)
    def token_str(t: int) -> str:
        """A token's text in logprobs (vLLM's "token_id:N" without a tokenizer)."""
        return llm.tokenizer.decode([t]) if llm.tokenizer is not None else f"token_id:{t}"

    async def complete(request: Request, body: P._Sampling, prompts: list, prompt_field: str,
                       chat: bool, echo: list[str] | None = None,
                       tools: ToolCalling | None = None):
        adapter = adapter_for(body.model)
        try:
            params = body.sampling(default_max_tokens=16 if not chat else llm.max_model_len)
        except SamplingParamsError as e:
            raise _as_api_error(e, prompt_field) from None
        if params.seed is not None and params.seed + body.n - 1 > MAX_SEED:
            raise P.ApiError(400, f"seed {params.seed} with n={body.n}: choice j uses seed + "
                             f"j, which must stay at most {MAX_SEED}", "seed")
        forced = tools.structured() if tools is not None else None
        if forced is not None:
            if params.structured is not None:
                raise P.ApiError(400, f"tool_choice {tools.mode} cannot be combined with "
                                 f"{body.structured()[1]}", "tool_choice")
            params = replace(params, structured=forced)
        try:
            rids = await submit(prompts, adapter, params, body.n, prompt_field)
        except P.ApiError as e:  # a schema, regex or grammar llguidance rejected
            if e.param == "structured_output":  # tool_choice's when it forced one
                e.param = "tool_choice" if forced is not None else body.structured()[1]
                e.message = f"{e.param}: {e.message}"
            raise
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        choice = _Choices(chat, token_str, echo and [e for e in echo for _ in range(body.n)],
                          tools)
        if body.stream:
            return _EngineStream(engine, rids, _sse(engine, rids, rid, body, choice,
                                                    error_body))
        try:
            outputs = await _collect(engine, rids, request)
        except RequestFailed as e:  # one of them failed inside a step (the rest aborted)
            raise _as_api_error(e, prompt_field) from None
        if outputs is None:  # the client went away: its requests are aborted
            return Response(status_code=499)
        choices = [choice(i, o.text, o.finish_reason, o.logprobs, delta=False)
                   for i, o in enumerate(outputs)]
        return P.envelope("chat.completion" if chat else "text_completion", rid, body.model,
                          choices, _usage(outputs, body.n))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request, body: P.CompletionRequest):
        prompts = body.prompts()
        echo = None
        if body.echo:
            echo = [p if isinstance(p, str) else token_text(p) for p in prompts]
        return await complete(request, body, prompts, "prompt", chat=False, echo=echo)

    def token_text(ids: list[int]) -> str:
        """The text echoed for a prompt of token ids (checked before decoding)."""
        if llm.tokenizer is None:
            raise P.ApiError(400, "echo of token ids needs a tokenizer", "echo")
        try:
            return llm.tokenizer.decode(llm.encode(ids))
        except ValueError as e:
            raise _as_api_error(e, "prompt") from None

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request, body: P.ChatCompletionRequest):
        tools = None
        if body.tools and body.tool_choice != "none":
            try:
                tools = ToolCalling(body.tools, body.tool_choice, tool_parser)
            except ToolError as e:
                raise P.ApiError(400, str(e), e.field) from None
        elif body.tool_choice not in (None, "none"):
            raise P.ApiError(400, "tool_choice needs tools", "tool_choice")
        conversation = body.conversation()
        text = await _off_loop(_render_chat, llm, conversation, True, body.tools,
                               size=sum(len(str(m.get("content") or "")) for m in conversation))
        return await complete(request, body, [text], "messages", chat=True, tools=tools)

    return app


INLINE_TEXT_CHARS = 16384
"""Text up to this long is rendered and tokenised on the event loop (tens of microseconds,
cheaper than a hop to a worker thread); longer text on a worker thread, so a huge prompt
stalls neither the engine nor other clients."""


async def _off_loop(fn, *args, size: int):
    if size <= INLINE_TEXT_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _render_chat(llm: LLM, conversation: list[dict], add_generation_prompt: bool,
                 tools: list[dict] | None = None) -> str:
    """The prompt text of a conversation (and tools) under the model's chat template."""
    try:
        return llm.render_chat(conversation, add_generation_prompt=add_generation_prompt,
                               tools=tools)
    except Exception as e:  # no template, or the template's own checks (roles alternate...)
        raise P.ApiError(400, f"the chat template rejected the messages: {e}"
                         if llm.tokenizer is not None and llm.tokenizer.chat_template else
                         f"{e}; use /v1/completions", "messages") from None


class _BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 in OpenAI's error JSON,
    decided from Content-Length or while the body arrives, before anything parses it.
    The body is read here and handed on whole; later receives (disconnects) pass through."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        too_big = not declared.isdigit() or int(declared) > self.max_bytes
        chunks: list[bytes] = []
        size = 0
        while not too_big:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_big = size > self.max_bytes
            if not message.get("more_body", False):
                break
        if too_big:
            response = _error(413, f"the request body is larger than {self.max_bytes} bytes "
                              "(the server's --max-request-bytes)", type="invalid_request_error")
            return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class _EngineStream(StreamingResponse):
    """Server-sent events whose requests are released however the response ends: even a
    client gone before the first chunk (when the body generator never starts)."""

    def __init__(self, engine: AsyncLLM, rids: list[str], content) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.engine, self.rids = engine, rids

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for rid in self.rids:
                self.engine.release(rid)


def _usage(outputs: list[Output], n: int) -> dict:
    prompts = outputs[::n]  # each prompt counted once, however many choices it has
    return P.usage(sum(len(o.prompt_token_ids) for o in prompts),
                   sum(len(o.token_ids) for o in outputs),
                   sum(o.cached_tokens for o in prompts))


async def _collect(engine: AsyncLLM, rids: list[str], request: Request) -> list[Output] | None:
    """Run requests to the end; None (and every one aborted) if the client disconnects."""
    async def last(rid: str) -> Output:
        async with contextlib.aclosing(engine.stream(rid)) as s:
            async for d in s:
                if d.output is not None:
                    return d.output
        raise RuntimeError(f"request {rid} ended without an output")

    task = asyncio.ensure_future(asyncio.gather(*(last(r) for r in rids)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _merged(engine: AsyncLLM, rids: list[str]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of several requests as they come, tagged with the choice index."""
    if len(rids) == 1:
        async with contextlib.aclosing(engine.stream(rids[0])) as s:
            async for d in s:
                yield 0, d
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, rid: str) -> None:
        try:
            async with contextlib.aclosing(engine.stream(rid)) as s:
                async for d in s:
                    q.put_nowait((i, d))
        except Exception as e:
            q.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(rids)]
    try:
        left = len(rids)
        while left:
            i, d = await q.get()
            if isinstance(d, Exception):
                raise d
            left -= d.finish_reason is not None
            yield i, d
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Choices:
    """Builds each choice (whole, or a stream's deltas) with its logprobs, with the prompt
    in front of its first text when echoing, and with tool calls parsed out of the text
    when the request has tools."""

    def __init__(self, chat: bool, token: Callable[[int], str], echo: list[str] | None,
                 tools: ToolCalling | None = None) -> None:
        self.chat, self.token, self.echo, self.tools = chat, token, echo, tools
        self.token_offset: dict[int, int] = {}
        """Per choice: where its next token starts in the text returned so far."""
        self.streams: dict[int, ToolStream] = {}

    def __call__(self, i: int, text: str, finish_reason: str | None,
                 lps: list[TokenLogprobs] | None, delta: bool) -> dict:
        first = i not in self.token_offset
        if first:
            prefix = self.echo[i] if self.echo else ""
            text = prefix + text
            self.token_offset[i] = len(prefix)
        logprobs = None
        if lps is not None:
            if self.chat:
                logprobs = P.chat_logprobs(lps, self.token)
            else:
                logprobs = P.completion_logprobs(lps, self.token, self.token_offset[i])
                self.token_offset[i] += sum(len(t) for t in logprobs["tokens"])
        if not self.chat:
            return P.completion_choice(i, text, finish_reason, logprobs)
        content, calls = text, None
        if self.tools is not None:
            if delta:
                stream = self.streams.setdefault(i, self.tools.stream())
                content, calls = stream.push(text, finish_reason is not None)
            else:
                content, found = self.tools.parse(text)
                calls = [{"id": call_id(), "type": "function", "function": c} for c in found]
            if calls and finish_reason == "stop" and self.tools.mode != "named":
                finish_reason = "tool_calls"
        return P.chat_choice(i, content, finish_reason, delta=delta, first=first,
                             logprobs=logprobs, tool_calls=calls)


async def _sse(engine: AsyncLLM, rids: list[str], rid: str, body: P._Sampling,
               choice: _Choices, error_body) -> AsyncIterator[str]:
    """OpenAI's stream: one `data: {chunk}` per delta, a usage chunk if asked, [DONE]."""
    kind = "chat.completion.chunk" if choice.chat else "text_completion"
    outputs: dict[int, Output] = {}

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        return f"data: {json.dumps(P.envelope(kind, rid, body.model, choices, usage))}\n\n"

    try:
        async for i, d in _merged(engine, rids):
            if d.output is not None:
                outputs[i] = d.output
            yield chunk([choice(i, d.text, d.finish_reason, d.logprobs, delta=True)])
        if body.include_usage:
            ordered = [outputs[i] for i in sorted(outputs)]
            yield chunk([], _usage(ordered, body.n))
    except Exception as e:  # this request failed mid-stream: say so in its stream
        err = _as_api_error(e, "messages" if choice.chat else "prompt") \
            if isinstance(e, ValueError | RequestFailed) \
            else P.ApiError(500, f"internal error: {type(e).__name__}: {e}",
                            type="internal_error")
        yield f"data: {json.dumps(error_body(err))}\n\n"
    yield "data: [DONE]\n\n"


# -- running it ------------------------------------------------------------------------
def serve(model_dir: str | Path, adapters: dict[str, Path] | None = None, *,
          host: str = "127.0.0.1", port: int = 8000, policy: str = "fastlibra",
          device_memory: int | None = None, host_memory: int | None = None,
          api_key: str | None = None, adapter_roots=(), **engine_kw) -> None:
    """Load the model and serve it until interrupted (Ctrl-C)."""
    cfg = ServerConfig(Path(model_dir), {k: Path(v) for k, v in (adapters or {}).items()},
                       host=host, port=port, policy=policy, device_memory=device_memory,
                       host_memory=host_memory, api_key=api_key,
                       adapter_roots=tuple(Path(r) for r in adapter_roots), **engine_kw)
    run_server(cfg)


def run_server(cfg: ServerConfig) -> None:
    import uvicorn

    for root in cfg.adapter_roots:
        if not root.is_dir():
            raise ValueError(f"--adapter-root {root}: not a directory")
    print(f"[fastlibra serve] loading {cfg.model_dir} with {len(cfg.adapters)} adapter(s), "
          f"policy {cfg.policy}", flush=True)
    engine = AsyncLLM(cfg.make_llm())
    print(f"[fastlibra serve] {engine.llm.calibration.describe()}", flush=True)
    try:
        app = build_app(engine, cfg)
        print(f"[fastlibra serve] serving '{cfg.model_name}' on http://{cfg.host}:{cfg.port}/v1",
              flush=True)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.uvicorn_log_level)
    finally:
        engine.close()
