"""The Python API: `LLM.generate` (synchronous) and `AsyncLLM.generate_stream` (asyncio).

    LLM ─add_request─► Scheduler queue        (prompt text -> ids, checks first)
        ─step────────► Engine.step ─► ModelExecutor (model + sampler)
                         │               └─ CacheManager(policy) ─Move─► ArenaMover
                         ▼
                  OutputTracker per request (text, stop strings, EOS, max tokens)

Memory budgets are bytes: the device pool (KV arena, unified with adapters in the cache's
books) and the host pool (a host arena of the same block layout) are cut into blocks of
`block_size` tokens of KV over all layers. The engine's clock is the wall clock (seconds
since the LLM was built).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlibra.cache import CacheError, CacheManager, Policy
from fastlibra.config import CacheConfig, SchedulerConfig
from fastlibra.engine.engine import Engine
from fastlibra.engine.request import Request, RequestState
from fastlibra.model.executor import ArenaMover, ModelExecutor
from fastlibra.model.forward import KVCache, ModelRunner
from fastlibra.model.loader import default_device, load_model, resolve_dtype
from fastlibra.model.lora import load_adapter
from fastlibra.model.sampling import (
    IncrementalDetokenizer,
    OutputTracker,
    SamplingParams,
)

Prompt = str | Sequence[int]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class PromptTooLong(ValueError):
    """The prompt leaves no room to generate within the model's context."""


@dataclass
class Output:
    """A finished request."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    """Generated token ids only (a stop token or EOS that ended the request included)."""
    finish_reason: str
    """"stop" (EOS, a stop token id or a stop string), "length" or "abort"."""
    adapter: str | None = None
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the cache (device or host) at admission."""


@dataclass
class Delta:
    """What one step added to a request: new token ids and new complete text."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class _Live:
    request: Request
    tracker: OutputTracker


class LLM:
    """A local model with LoRA adapters behind the FastLibra engine.

    `adapters` maps names to PEFT directories (each is read and checked here, then
    loaded on demand by the cache). `device_memory` / `host_memory` are bytes for the
    device and host pools (default: 80 % of free GPU memory after the weights, or
    256 MiB on CPU; host: the device size, at most 4 GiB)."""

    def __init__(self, model_dir: str | Path, adapters: dict[str, str | Path] | None = None, *,
                 device_memory: int | None = None, host_memory: int | None = None,
                 policy: str | Policy = "fastlibra", dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_batched_tokens: int = 2048,
                 max_lora_rank: int = 256, tokenizer=None) -> None:
        self._t0 = time.perf_counter()
        dev = torch.device(device) if device is not None else default_device()
        dt = resolve_dtype(dtype if dtype is not None else
                           ("bfloat16" if dev.type == "cuda" else "float32"))
        self.weights = load_model(model_dir, dtype=dt, device=dev)
        cfg = self.weights.config
        self.model_config = cfg
        self.max_model_len = cfg.max_position_embeddings
        shape = cfg.shape(dtype_bytes=torch.empty((), dtype=dt).element_size())
        block_bytes = block_size * shape.kv_bytes_per_token
        if device_memory is None:
            device_memory = (int(0.8 * torch.cuda.mem_get_info(dev)[0]) if dev.type == "cuda"
                             else 256 * 2**20)
        if host_memory is None:
            host_memory = min(device_memory, 4 * 2**30)
        device_blocks = device_memory // block_bytes
        if device_blocks < 1:
            raise CacheError(f"device_memory={device_memory} bytes is less than one KV block "
                             f"({block_bytes} bytes = {block_size} tokens); give it more")
        host_blocks = max(0, host_memory) // block_bytes

        sizes: dict[str, int] = {}
        paths = {name: Path(p) for name, p in (adapters or {}).items()}
        for name, path in paths.items():  # read and check every adapter now, keep its size
            sizes[name] = load_adapter(path, cfg, max_rank=max_lora_rank, name=name,
                                       dtype=dt, device="cpu").nbytes
        self.runner = ModelRunner(self.weights, KVCache(cfg, device_blocks, block_size, dt, dev))
        self.mover = ArenaMover(self.runner, host_blocks, paths, max_rank=max_lora_rank,
                                clock=self._clock)
        self.cache = CacheManager(CacheConfig(model=shape, device_blocks=device_blocks,
                                              host_blocks=host_blocks, block_size=block_size),
                                  policy, mover=self.mover)
        for name, nbytes in sizes.items():
            self.cache.register_adapter(name, nbytes)
        self.mover.sync_adapters(self.cache)  # policies that start adapters in host memory
        self.executor = ModelExecutor(self.runner, self._alloc, clock=self._clock)
        self.engine = Engine(SchedulerConfig(max_num_seqs=max_num_seqs,
                                             max_batched_tokens=max_batched_tokens,
                                             layerwise_copies=False),
                             self.cache, self.executor)
        self.tokenizer = _load_tokenizer(tokenizer, Path(model_dir))
        eos = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._ids = itertools.count()
        self._live: dict[str, _Live] = {}
        self._done: dict[str, Output] = {}

    def _clock(self) -> float:
        return time.perf_counter() - self._t0

    def _alloc(self, request_id: str):
        return self.engine.scheduler.allocs[request_id]

    # -- requests ------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer files "
                                 f"({', '.join(TOKENIZER_FILES)}); pass token ids")
            return list(self.tokenizer.encode(prompt))
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:4]} outside the vocabulary "
                             f"(0..{self.model_config.vocab_size - 1})")
        return ids

    def _prepare(self, prompt: Prompt, adapter: str | None,
                 sampling: SamplingParams | None) -> tuple[list[int], str | None, SamplingParams, int]:
        """Check one request completely before anything is queued."""
        ids = self.encode(prompt)
        adapter = adapter or None
        self.cache.adapter(adapter)  # UnknownAdapter names the registered ones
        params = sampling if sampling is not None else SamplingParams()
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens but the model's context is "
                f"{self.max_model_len} tokens (max_position_embeddings); at most "
                f"{self.max_model_len - 1} prompt tokens leave room to generate")
        max_new = min(params.max_tokens, self.max_model_len - len(ids))
        self.cache.check_fits(adapter, len(ids) + max_new)
        return ids, adapter, params, max_new

    def add_request(self, prompt: Prompt, adapter: str | None = None,
                    sampling: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue one request now; returns its id. Raises before queueing anything if the
        adapter is unknown, the prompt too long or the request can never fit."""
        return self._submit(*self._prepare(prompt, adapter, sampling), request_id)

    def _submit(self, ids: list[int], adapter: str | None, params: SamplingParams,
                max_new: int, request_id: str | None = None) -> str:
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._live:
            raise ValueError(f"request id {rid!r} is already running")
        self.engine.now = max(self.engine.now, self._clock())
        req = Request(rid, ids, max_new, arrival=self.engine.now, adapter=adapter)
        detok = (IncrementalDetokenizer(self.tokenizer, ids)
                 if self.tokenizer is not None else None)
        self._live[rid] = _Live(req, OutputTracker(params, max_new, detok, self.eos_token_ids))
        self.executor.set_sampling(rid, params)
        # It arrives now: straight into the scheduler's queue (abort can then find it).
        self.engine.scheduler.add(req, self.engine.now)
        return rid

    @property
    def has_unfinished(self) -> bool:
        return bool(self._live)

    def step(self) -> list[Delta]:
        """One engine step on the wall clock; what each request gained in it."""
        eng = self.engine
        eng.now = max(eng.now, self._clock())
        eng.step()
        eng.finished.clear()  # outputs are kept here, not in the engine
        out: list[Delta] = []
        for rid, live in list(self._live.items()):
            req, tr = live.request, live.tracker
            new = req.generated[len(tr.token_ids):]
            for t in new:
                if tr.append(t):
                    break
            if req.state is RequestState.REJECTED:  # check_fits makes this unreachable
                raise CacheError(req.reject_reason or f"request {rid} was rejected")
            if tr.finished:
                self._finish(live)
            if new:
                ids, text = tr.take_delta()
                out.append(Delta(rid, text, ids, tr.finish_reason))
        self.mover.sync_adapters(self.cache)
        return out

    def _finish(self, live: _Live) -> None:
        """Release a finished (or aborted) request's blocks at once and keep its output."""
        req, tr = live.request, live.tracker
        s = self.engine.scheduler
        if req.state is RequestState.RUNNING:
            s.finish(req, self.engine.now)
        elif req.state is RequestState.WAITING:
            s.waiting.remove(req)
            self.cache.set_demand(req.adapter, req.prompt, -1)
            req.state = RequestState.FINISHED
        del self._live[req.request_id]
        self.executor.release(req.request_id)
        self._done[req.request_id] = Output(req.request_id, list(req.prompt), tr.text,
                                            list(tr.token_ids), tr.finish_reason or "abort",
                                            req.adapter, req.cached_tokens)

    def abort(self, request_id: str) -> Delta | None:
        """Stop a request now: its blocks go back to the cache (what it computed stays
        cached). Returns its last delta (finish_reason "abort"), or None if it is not
        running."""
        live = self._live.get(request_id)
        if live is None:
            return None
        live.tracker.abort()
        self._finish(live)
        ids, text = live.tracker.take_delta()
        return Delta(request_id, text, ids, live.tracker.finish_reason)

    def take_output(self, request_id: str) -> Output | None:
        return self._done.pop(request_id, None)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 adapter: str | None | Sequence[str | None] = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[Output]:
        """Run prompts to completion, batched together; outputs in prompt order. `adapter`
        and `sampling` are one for all prompts or one per prompt."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        batch: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item]
        adapters = _per_prompt(adapter, len(batch), "adapter", (str, type(None)))
        params = _per_prompt(sampling, len(batch), "sampling", (SamplingParams, type(None)))
        prepared = [self._prepare(p, a, s) for p, a, s in zip(batch, adapters, params,
                                                               strict=True)]
        rids = [self._submit(*prep) for prep in prepared]
        while any(rid in self._live for rid in rids):
            self.step()
        return [self._done.pop(rid) for rid in rids]


def _per_prompt(value, n: int, name: str, scalar: tuple[type, ...]) -> list:
    if isinstance(value, scalar):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} {name} values for {n} prompts; give one, or one "
                         "per prompt")
    return values


def _load_tokenizer(tokenizer, model_dir: Path):
    """A transformers tokenizer: the one given, or the model directory's (None if the
    directory has no tokenizer files: then prompts are token ids and text is empty)."""
    if tokenizer is not None and not isinstance(tokenizer, str | Path):
        return tokenizer
    path = Path(tokenizer) if tokenizer is not None else model_dir
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        if tokenizer is not None:
            raise ValueError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class AsyncLLM:
    """An asyncio front for `LLM`: submit, iterate over a request's deltas, abort.

    Steps run on the event loop (a step blocks it for its duration); a driver task runs
    while requests are unfinished. Close a stream you stop reading early
    (`contextlib.aclosing`) so its request is aborted at once."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._queues: dict[str, asyncio.Queue] = {}
        self._driver: asyncio.Task | None = None

    async def generate_stream(self, prompt: Prompt, adapter: str | None = None,
                              sampling: SamplingParams | None = None,
                              request_id: str | None = None) -> AsyncIterator[Delta]:
        rid = self.llm.add_request(prompt, adapter, sampling, request_id)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._queues.pop(rid, None)
            self.llm.abort(rid)  # no-op when it finished
            self.llm.take_output(rid)

    def abort(self, request_id: str) -> bool:
        """Stop a request now (its blocks are freed before this returns); its stream ends
        with finish_reason "abort". False if it was not running."""
        delta = self.llm.abort(request_id)
        if delta is None:
            return False
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(delta)
        return True

    async def _drive(self) -> None:
        try:
            while self.llm.has_unfinished:
                for delta in self.llm.step():
                    queue = self._queues.get(delta.request_id)
                    if queue is not None:
                        queue.put_nowait(delta)
                await asyncio.sleep(0)  # let consumers (and abort) run between steps
        except Exception as e:  # hand the failure to every waiting stream
            for queue in self._queues.values():
                queue.put_nowait(e)
