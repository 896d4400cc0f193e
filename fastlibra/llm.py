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
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fastlibra.cache import CacheError, CacheManager, Policy, UnknownAdapter, get_policy
from fastlibra.calibrate import Calibration
from fastlibra.config import CacheConfig, HardwareProfile, SchedulerConfig
from fastlibra.engine.engine import Engine
from fastlibra.engine.request import Request, RequestState
from fastlibra.model.executor import ArenaMover, ModelExecutor, RequestFailed
from fastlibra.model.forward import KVCache, ModelRunner, SeqInput
from fastlibra.model.grammar import GrammarCompiler
from fastlibra.model.loader import default_device, load_model, resolve_dtype
from fastlibra.model.sampling import (
    IncrementalDetokenizer,
    OutputTracker,
    Sampler,
    SamplingParams,
    SamplingParamsError,
    TokenLogprobs,
)

Prompt = str | Sequence[int]
log = logging.getLogger("fastlibra")


def scheduler_config(max_num_seqs: int = 256, max_batched_tokens: int = 2048,
                     max_loras: int | None = None) -> SchedulerConfig:
    """How `LLM` batches; the simulator reproduces the real engine with this same config
    (`bench fidelity`)."""
    return SchedulerConfig(max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
                           max_loras=max_loras)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
PEEK_CHARS_PER_TOKEN = 8
PEEK_SLACK = 16
"""See `LLM._refuse_long_text`: English runs ~4 characters per token."""
MAX_ADAPTER_NAME = 256
"""Characters in an adapter name at most: names are echoed in `model` fields and metrics."""
VLLM_DTYPES = {"auto": None, "half": "float16", "float": "float32"}
"""vLLM's --dtype spellings that are not ours."""


def _check_engine_args(enable_lora: bool, tensor_parallel_size: int, max_loras: int | None,
                       max_cpu_loras: int | None) -> None:
    """vLLM's engine arguments this engine cannot honour are refused, never ignored."""
    if enable_lora is not True:
        raise ValueError("enable_lora=False is not supported: FastLibra always serves "
                         "adapters (leave it True)")
    if tensor_parallel_size != 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size}: one engine runs on "
                         "one device here; run replicas instead (tensor parallelism is "
                         "not implemented)")
    if max_loras is not None and max_loras < 1:
        raise ValueError(f"max_loras={max_loras} must be at least 1")
    if max_cpu_loras is not None and max_cpu_loras < (max_loras or 1):
        raise ValueError(f"max_cpu_loras={max_cpu_loras} must be at least max_loras "
                         f"({max_loras or 1})")


class PromptTooLong(ValueError):
    """The prompt leaves no room to generate within the model's context."""


@dataclass(frozen=True)
class Logprob:
    """vLLM's `Logprob`: a token's logprob and its rank (1 = most likely)."""

    logprob: float
    rank: int


@dataclass
class CompletionOutput:
    """One generated sequence, shaped like vLLM's `CompletionOutput`."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[int, Logprob]] | None = None
    """Per token: the sampled one and the `logprobs` most likely, by token id."""
    cumulative_logprob: float | None = None


def check_adapter_name(name: str) -> None:
    """An adapter name must be non-empty, printable and at most `MAX_ADAPTER_NAME` long."""
    if not isinstance(name, str) or not name:
        raise ValueError("an adapter needs a non-empty name")
    if len(name) > MAX_ADAPTER_NAME:
        raise ValueError(f"adapter name of {len(name)} characters; at most "
                         f"{MAX_ADAPTER_NAME} are allowed")
    if not name.isprintable() or name != name.strip():
        raise ValueError(f"adapter name {name[:40]!r} has unprintable characters or "
                         "surrounding spaces")


@dataclass
class Output:
    """A finished request. `outputs[0]`, `prompt` and `prompt_token_ids` read as vLLM's
    `RequestOutput` does; `text`, `token_ids` and `finish_reason` are also here."""

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
    ttft: float | None = None
    """Seconds from arrival to the first token (None if aborted before it)."""
    tpot: float | None = None
    """Mean seconds per output token after the first (None with fewer than two)."""
    e2e: float = 0.0
    """Seconds from arrival to finish (or abort)."""
    prompt: str | None = None
    """The prompt as text, when it was given as text."""
    logprobs: list[TokenLogprobs] | None = None
    """Per generated token, when the request asked for logprobs."""
    error: Exception | None = None
    """Why a request that failed alone failed (its finish_reason is "abort")."""

    @property
    def outputs(self) -> list[CompletionOutput]:
        lps = None if self.logprobs is None else [
            {t: Logprob(v, rank=r + 1) for r, (t, v) in enumerate(lp.top)}
            | {lp.token_id: Logprob(lp.logprob, lp.rank)} for lp in self.logprobs]
        return [CompletionOutput(0, self.text, self.token_ids, self.finish_reason, lps,
                                 None if lps is None else
                                 sum(lp.logprob for lp in self.logprobs))]

    @property
    def finished(self) -> bool:
        return True


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's adapter handle: a name, a unique id >= 1 and the PEFT directory. The first
    request that names it loads it (`LLM.add_adapter`); later ones reuse it."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise TypeError(f"LoRARequest.lora_name must be a non-empty str, got "
                            f"{self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) \
                or self.lora_int_id < 1:
            raise TypeError(f"LoRARequest.lora_int_id must be an int >= 1, got "
                            f"{self.lora_int_id!r}")


@dataclass
class Delta:
    """What one step added to a request: new token ids, new complete text, and the new
    tokens' logprobs when the request asked for them."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    output: Output | None = None
    """Set by `AsyncLLM` on a request's last delta."""
    error: Exception | None = None
    """Why the request failed (finish_reason "abort"): a `RequestFailed` of its own."""


@dataclass
class EngineStats:
    """A snapshot of the engine for monitoring (the server's /metrics reads it)."""

    waiting: int
    running: int
    prompt_tokens: int
    device_hit_tokens: int
    host_hit_tokens: int
    bytes_moved: dict[str, int]
    """Cumulative bytes by move kind (swap_in, swap_out, load, load_host)."""
    pool_blocks: dict[str, dict[str, int]]
    """Blocks by kind (adapter, kv_cached, kv_running, invalid_kv, free) per pool."""
    block_bytes: int
    adapters: int


@dataclass
class _Live:
    request: Request
    tracker: OutputTracker
    prompt: str | None = None


DEFAULT_MAX_MODEL_LEN = 8192
"""Context length (prompt + generated) when none is given: chats, few-shot prompts and
agent turns fit, and one request cannot claim the arena a 128k position limit would
allow (Llama 3.1 declares 131,072). Raise it with `max_model_len` / `--max-model-len`."""


def _max_model_len(asked: int | None, limit: int) -> int:
    if asked is None:
        return min(DEFAULT_MAX_MODEL_LEN, limit)
    if isinstance(asked, bool) or not isinstance(asked, int) or not 1 < asked <= limit:
        raise ValueError(f"max_model_len={asked!r} must be an integer in 2..{limit} "
                         "(the model's max_position_embeddings)")
    return asked


def device_pool_bytes(total: int, free: int, peak: int, utilization: float) -> int:
    """Bytes left for the device arena: `utilization` x `total` GPU memory, less what is
    in use already (`total - free`: weights, CUDA context, other processes) and less the
    activation `peak` of the largest step."""
    return int(utilization * total) - (total - free) - peak


@torch.inference_mode()
def _profile_device_memory(weights, block_size: int, max_num_seqs: int,
                           max_batched_tokens: int, utilization: float) -> int:
    """Run the largest step the scheduler may batch (`max_batched_tokens` tokens spread
    over up to `max_num_seqs` sequences, all logits) on a throwaway arena and size the
    real arena from its peak (`device_pool_bytes`)."""
    dev, cfg = weights.device, weights.config
    nseq = max(1, min(max_num_seqs, max_batched_tokens))
    per = [max_batched_tokens // nseq + (i < max_batched_tokens % nseq) for i in range(nseq)]
    need = [-(-n // block_size) for n in per]
    kv = KVCache(cfg, sum(need), block_size, weights.dtype, dev)
    runner = ModelRunner(weights, kv)
    first = [sum(need[:i]) for i in range(nseq)]
    seqs = [SeqInput([1] * n, 0, list(range(f, f + k)), None)
            for n, f, k in zip(per, first, need, strict=True)]
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    runner.forward(seqs)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    del runner, kv
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    budget = device_pool_bytes(total, free, peak, utilization)
    if budget <= 0:
        raise CacheError(f"no GPU memory left for the KV/adapter arena: "
                         f"{utilization:.0%} of {total / 2**30:.1f} GiB is "
                         f"{utilization * total / 2**30:.1f} GiB, {(total - free) / 2**30:.1f} "
                         f"GiB are in use and a {max_batched_tokens}-token step peaks at "
                         f"{peak / 2**30:.2f} GiB; raise --gpu-memory-utilization or lower "
                         "--max-batched-tokens")
    return budget


class LLM:
    """A local model with LoRA adapters behind the FastLibra engine.

    `adapters` maps names to PEFT directories (each is read and checked here, then
    loaded on demand by the cache). `device_memory` / `host_memory` are bytes for the
    device and host pools. Default device pool on CUDA: what is left of
    `gpu_memory_utilization` x the GPU's memory after everything already on it (the
    weights, other processes) and the peak of a profiled forward pass of
    `max_num_batched_tokens` tokens over `max_num_seqs` sequences (vLLM's meaning); on CPU
    256 MiB. Host pool: the device size, at most 4 GiB. `max_model_len` (prompt +
    generated tokens) defaults to `DEFAULT_MAX_MODEL_LEN`, capped by the model's
    position limit. The cache's cost model prices misses with `hardware` (default
    `HardwareProfile()`) as measured on this machine at start-up and refined while
    serving (`calibrate.py`), or exactly as given with `calibrate=False`.

    vLLM's engine arguments mean here what they mean there: `max_loras` (distinct
    adapters in one batch; default no limit), `max_lora_rank`, `max_cpu_loras` (the host
    tier holds at most this many of the largest start-up adapter's size, and is grown to
    hold them when its size is not given), `gpu_memory_utilization`,
    `max_model_len`, `max_num_seqs`, `max_num_batched_tokens`, `block_size`, `dtype`
    ("auto" = bfloat16 on CUDA, float32 on CPU), `seed` (the RNG of unseeded requests),
    `enable_prefix_caching` (False = no KV kept across requests), `swap_space` (GiB of
    host tier). `enable_lora` must stay True: adapters are always on."""

    def __init__(self, model: str | Path, adapters: dict[str, str | Path] | None = None, *,
                 device_memory: int | None = None, host_memory: int | None = None,
                 policy: str | Policy = "fastlibra", dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_lora_rank: int = 256, tokenizer=None, enable_lora: bool = True,
                 max_loras: int | None = None, max_cpu_loras: int | None = None,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 swap_space: float | None = None, seed: int | None = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 hardware: HardwareProfile | None = None, calibrate: bool = True) -> None:
        self._t0 = time.perf_counter()
        _check_engine_args(enable_lora, tensor_parallel_size, max_loras, max_cpu_loras)
        if swap_space is not None:
            if host_memory is not None:
                raise ValueError("give the host tier as swap_space (GiB) or host_memory "
                                 "(bytes), not both")
            host_memory = int(swap_space * 2**30)
        if seed is not None:
            torch.manual_seed(seed)
        policy = get_policy(policy) if isinstance(policy, str) else policy
        if not enable_prefix_caching:
            policy = replace(policy, reuse_kv=False, host_kv=False)
        dev = torch.device(device) if device is not None else default_device()
        dtype = VLLM_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        dt = resolve_dtype(dtype if dtype is not None else
                           ("bfloat16" if dev.type == "cuda" else "float32"))
        self.weights = load_model(model, dtype=dt, device=dev)
        cfg = self.weights.config
        self.model_config = cfg
        self.max_model_len = _max_model_len(max_model_len, cfg.max_position_embeddings)
        shape = cfg.shape(dtype_bytes=torch.empty((), dtype=dt).element_size())
        self.block_bytes = block_bytes = block_size * shape.kv_bytes_per_token
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
        if device_memory is None:
            device_memory = (_profile_device_memory(self.weights, block_size, max_num_seqs,
                                                    max_num_batched_tokens, gpu_memory_utilization)
                             if dev.type == "cuda" else 256 * 2**20)
        host_given = host_memory is not None
        if host_memory is None:
            host_memory = min(device_memory, 4 * 2**30)
        device_blocks = device_memory // block_bytes
        if device_blocks < 1:
            raise CacheError(f"device_memory={device_memory} bytes is less than one KV block "
                             f"({block_bytes} bytes = {block_size} tokens); give it more")
        host_blocks = max(0, host_memory) // block_bytes

        self.runner = ModelRunner(self.weights, KVCache(cfg, device_blocks, block_size, dt, dev))
        hardware = hardware or HardwareProfile()
        self.calibration = Calibration.measure(self.runner, hardware) if calibrate \
            else Calibration(hardware, measured=False)
        self.mover = ArenaMover(self.runner, host_blocks, max_rank=max_lora_rank,
                                hardware=self.calibration.profile, clock=self._clock)
        for name in adapters or {}:
            check_adapter_name(name)
        t_read = time.perf_counter()
        sizes = {name: self.mover.read_adapter(name, path)  # read and check each one now
                 for name, path in (adapters or {}).items()}
        self.calibration.observe_reads(sum(sizes.values()), time.perf_counter() - t_read)
        self.mover.hw = self.calibration.profile
        host_adapter_blocks = None  # vLLM's max_cpu_loras, in blocks
        if max_cpu_loras is not None and sizes:
            host_adapter_blocks = max_cpu_loras * -(-max(sizes.values()) // block_bytes)
            if host_given and host_blocks < host_adapter_blocks:
                raise CacheError(f"max_cpu_loras={max_cpu_loras} adapters need "
                                 f"{host_adapter_blocks} host blocks; the host tier has "
                                 f"{host_blocks}: give it more")
            if host_adapter_blocks > host_blocks:
                host_blocks = host_adapter_blocks
                self.mover.resize_host(host_blocks)
        self.cache = CacheManager(CacheConfig(model=shape, device_blocks=device_blocks,
                                              host_blocks=host_blocks, block_size=block_size,
                                              host_adapter_blocks=host_adapter_blocks,
                                              hardware=self.calibration.profile),
                                  policy, mover=self.mover)
        self.calibration.attach(self.cache.cost)
        log.info(self.calibration.describe())
        if self.cache.device_adapter_pool is not self.cache.device_kv_pool:
            self.mover.adapter_block_offset = self.cache.device_kv_pool.capacity
        for name, nbytes in sizes.items():
            self.cache.register_adapter(name, nbytes)
        self.mover.sync_adapters(self.cache)  # policies that start adapters in host memory
        self.tokenizer = _load_tokenizer(tokenizer, Path(model))
        eos = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.grammars = (GrammarCompiler(self.tokenizer, cfg.vocab_size, sorted(eos))
                         if self.tokenizer is not None else None)
        self.executor = ModelExecutor(self.runner, self._alloc, Sampler(eos, self.grammars),
                                      clock=self._clock, wait_for=self.mover.wait_for)
        self.executor.on_step = self.calibration.observe_step
        self.engine = Engine(scheduler_config(max_num_seqs, max_num_batched_tokens, max_loras),
                             self.cache, self.executor)
        self._ids = itertools.count()
        self._live: dict[str, _Live] = {}
        self._done: dict[str, Output] = {}
        self._draining: set[str] = set()
        """Adapters being unloaded: no new requests; unregistered when their last ends."""
        self._lora_ids: dict[int, str] = {}
        """`LoRARequest.lora_int_id` -> adapter name, so an id names one adapter."""

    def _clock(self) -> float:
        return time.perf_counter() - self._t0

    def _alloc(self, request_id: str):
        return self.engine.scheduler.allocs[request_id]

    # -- adapters ------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """The adapters a request may name now (registered and not being unloaded)."""
        return sorted(n for n in self.cache.adapters if n not in self._draining)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Serve a PEFT adapter from `path` under `name`. The files are read and checked
        now (`AdapterLoadError` names the file and the problem); the weights reach the
        device when a request needs them."""
        check_adapter_name(name)
        if name in self._draining:
            raise ValueError(f"adapter {name!r} is being unloaded; its running requests "
                             "finish first, then the name can be loaded again")
        if name in self.cache.adapters:
            raise ValueError(f"adapter {name!r} is already loaded; unload it first")
        nbytes = self.mover.read_adapter(name, path)
        try:
            self.cache.register_adapter(name, nbytes)
        except CacheError:
            self.mover.forget_adapter(name)
            raise
        try:
            self.mover.sync_adapters(self.cache)  # may read it into host memory now
        except Exception:
            self.cache.unregister_adapter(name)
            self.mover.forget_adapter(name)
            raise

    def remove_adapter(self, name: str) -> int:
        """Stop accepting requests for `name`. Requests already queued or running with it
        finish first; then its weights and KV leave every tier. Returns their number."""
        if name in self._draining:
            raise UnknownAdapter(f"adapter {name!r} is already being unloaded")
        self.cache.adapter(name)  # UnknownAdapter for names never loaded
        users = sum(1 for live in self._live.values() if live.request.adapter == name)
        self._draining.add(name)
        self._reap_drained()
        return users

    def _reap_drained(self) -> None:
        busy = {live.request.adapter for live in self._live.values()}
        for name in list(self._draining - busy):
            self._draining.discard(name)
            self.cache.unregister_adapter(name)
            self.mover.forget_adapter(name)
        self.mover.sync_adapters(self.cache)

    def stats(self) -> EngineStats:
        s = self.cache.stats
        return EngineStats(
            waiting=len(self.engine.scheduler.waiting),
            running=len(self.engine.scheduler.running),
            prompt_tokens=s.prompt_tokens, device_hit_tokens=s.device_hit_tokens,
            host_hit_tokens=s.host_hit_tokens, bytes_moved=dict(s.bytes_moved),
            pool_blocks=self.cache.usage(), block_bytes=self.block_bytes,
            adapters=len(self.adapter_names))

    # -- requests ------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, checked: text that is valid Unicode, ids inside the
        vocabulary, not empty, shorter than the context. It reads only the tokenizer and
        the model's config, so any thread may call it (the server tokenises off the
        engine thread; `add_request` then checks the ids again, cheaply)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer files "
                                 f"({', '.join(TOKENIZER_FILES)}); pass token ids")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"the prompt is not valid Unicode text: {e.reason} at "
                                 f"character {e.start}") from None
            self._refuse_long_text(prompt)
            try:
                ids = list(self.tokenizer.encode(prompt))
            except Exception as e:  # the tokenizer's own refusal: this prompt's fault
                raise ValueError(f"the tokenizer could not encode the prompt: {e}") from None
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:4]} outside the vocabulary "
                                 f"(0..{self.model_config.vocab_size - 1})")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens but the model's context is "
                f"{self.max_model_len} tokens (max_model_len); at most "
                f"{self.max_model_len - 1} prompt tokens leave room to generate")
        return ids

    def _refuse_long_text(self, text: str) -> None:
        """A text of more than `PEEK_CHARS_PER_TOKEN` characters per context token is
        refused if its head alone, cut at a space, has more tokens than the context
        (with `PEEK_SLACK` to spare for merges across the cut): a 20 MB prompt then costs
        a few thousand tokens of tokenising, not millions. A text that is long but
        tokenises short (few, long words) goes on to be tokenised whole."""
        peek = PEEK_CHARS_PER_TOKEN * self.max_model_len
        if len(text) <= peek:
            return
        cut = text.rfind(" ", 0, peek)
        head = len(self.tokenizer.encode(text[:cut if cut > 0 else peek],
                                         add_special_tokens=False))
        if head > self.max_model_len + PEEK_SLACK:
            raise PromptTooLong(
                f"the prompt has more than {self.max_model_len} tokens (its first "
                f"{cut if cut > 0 else peek} characters alone have {head}) but the "
                f"model's context is {self.max_model_len} tokens (max_model_len)")

    def _prepare(self, prompt: Prompt, adapter: str | None,
                 sampling: SamplingParams | None) -> tuple[list[int], str | None, SamplingParams, int]:
        """Check one request completely before anything is queued."""
        ids = self.encode(prompt)
        adapter = adapter or None
        if adapter in self._draining:
            raise UnknownAdapter(f"adapter {adapter!r} is being unloaded")
        self.cache.adapter(adapter)  # UnknownAdapter
        params = sampling if sampling is not None else SamplingParams()
        if params.structured is not None:  # compiled now (once): a bad schema fails here
            if self.grammars is None:
                raise SamplingParamsError("structured_output", "structured output needs "
                                          "the model's tokenizer files")
            self.grammars.compiled(params.structured)
        vocab = self.model_config.vocab_size
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise SamplingParamsError("logit_bias", f"logit_bias token id "
                                      f"{max(params.logit_bias)} is outside the vocabulary "
                                      f"(0..{vocab - 1})")
        max_new = min(params.max_tokens, self.max_model_len - len(ids))
        self.cache.check_fits(adapter, len(ids) + max_new)
        return ids, adapter, params, max_new

    def add_request(self, prompt: Prompt, adapter: str | None = None,
                    sampling: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue one request now; returns its id. Raises before queueing anything if the
        adapter is unknown, the prompt too long or the request can never fit."""
        return self._submit(*self._prepare(prompt, adapter, sampling), request_id,
                            prompt=prompt if isinstance(prompt, str) else None)

    def _submit(self, ids: list[int], adapter: str | None, params: SamplingParams,
                max_new: int, request_id: str | None = None, prompt: str | None = None) -> str:
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._live:
            raise ValueError(f"request id {rid!r} is already running")
        self.engine.now = max(self.engine.now, self._clock())
        req = Request(rid, ids, max_new, arrival=self.engine.now, adapter=adapter)
        detok = (IncrementalDetokenizer(self.tokenizer, ids)
                 if self.tokenizer is not None else None)
        self._live[rid] = _Live(req, OutputTracker(params, max_new, detok, self.eos_token_ids),
                                prompt)
        self.executor.set_sampling(rid, params)
        # It arrives now: straight into the scheduler's queue (abort can then find it).
        self.engine.scheduler.add(req, self.engine.now)
        return rid

    @property
    def has_unfinished(self) -> bool:
        return bool(self._live)

    @property
    def unfinished_ids(self) -> list[str]:
        return list(self._live)

    def step(self) -> list[Delta]:
        """One engine step on the wall clock; what each request gained in it."""
        eng = self.engine
        eng.now = max(eng.now, self._clock())
        eng.step()
        eng.finished.clear()  # outputs are kept here, not in the engine
        out = self._end_failed()
        for rid, live in list(self._live.items()):
            req, tr = live.request, live.tracker
            new = req.generated[len(tr.token_ids):]
            lps = self.executor.take_logprobs(rid) if tr.logprobs is not None else []
            for t, lp in itertools.zip_longest(new, lps):
                if tr.append(t, lp):
                    break
            if req.state is RequestState.REJECTED:  # check_fits makes this unreachable
                raise CacheError(req.reject_reason or f"request {rid} was rejected")
            if tr.finished:
                self._finish(live)
            if new:
                out.append(Delta(rid, *tr.take_delta(), finish_reason=tr.finish_reason))
        self.mover.forget_dropped(self.cache)  # adapters the step dropped (no move)
        self.calibration.refresh(self.mover.bandwidth, self.mover.load_s_per_byte)
        return out

    def _end_failed(self) -> list[Delta]:
        """End the requests the step failed, and every request of an adapter whose read
        failed (that adapter is then unloaded); the other requests are untouched."""
        failed = self.executor.failed
        self.executor.failed = {}
        broken = self.mover.failed_adapters()
        for rid, live in self._live.items():
            name = live.request.adapter
            if name in broken and rid not in failed:
                failed[rid] = RequestFailed.unreadable(name, broken[name])
        out = [d for rid, e in failed.items() if (d := self.abort(rid, e)) is not None]
        for name in broken:
            if name in self.cache.adapters and name not in self._draining:
                self.remove_adapter(name)
            elif name not in self.cache.adapters:
                self.mover.forget_adapter(name)
        return out

    def _finish(self, live: _Live, error: Exception | None = None) -> None:
        """Release a finished (or aborted) request's blocks at once and keep its output."""
        req, tr = live.request, live.tracker
        s = self.engine.scheduler
        if req.state is RequestState.RUNNING:
            s.finish(req, self.engine.now)
        elif req.state is RequestState.WAITING:
            s.waiting.remove(req)
            self.cache.remove_demand(req.request_id)
            req.state = RequestState.FINISHED
        del self._live[req.request_id]
        self.executor.release(req.request_id)
        now = max(self.engine.now, self._clock())
        self._done[req.request_id] = Output(
            req.request_id, list(req.prompt), tr.text, list(tr.token_ids),
            tr.finish_reason or "abort", req.adapter, req.cached_tokens, ttft=req.ttft,
            tpot=(now - req.t_first_token) / (len(tr.token_ids) - 1)
            if req.t_first_token is not None and len(tr.token_ids) > 1 else None,
            e2e=now - req.arrival, prompt=live.prompt, logprobs=tr.logprobs, error=error)
        if req.adapter in self._draining:
            self._reap_drained()

    def abort(self, request_id: str, error: Exception | None = None) -> Delta | None:
        """Stop a request now: its blocks go back to the cache (what it computed stays
        cached). Returns its last delta (finish_reason "abort", with `error` if given), or
        None if it is not running."""
        live = self._live.get(request_id)
        if live is None:
            return None
        live.tracker.abort()
        self._finish(live, error)
        return Delta(request_id, *live.tracker.take_delta(),
                     finish_reason=live.tracker.finish_reason, error=error)

    def close(self) -> None:
        """Finish the copies in flight and stop the copy thread."""
        self.mover.close()

    def take_output(self, request_id: str) -> Output | None:
        return self._done.pop(request_id, None)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None, *,
                 adapter: str | None | Sequence[str | None] = None,
                 use_tqdm: bool = True) -> list[Output]:
        """Run prompts to completion, batched together; outputs in prompt order, as vLLM's
        `LLM.generate`. A prompt is text, token ids, or a dict with "prompt" or
        "prompt_token_ids". The adapter is a `lora_request` (vLLM's form: loaded on first
        use) or a registered name in `adapter`; each argument is one for all prompts or
        one per prompt. `use_tqdm` is accepted (no progress bar is drawn)."""
        batch = _prompt_list(prompts)
        params = _per_prompt(sampling_params, len(batch), "sampling_params",
                             (SamplingParams, type(None)))
        if lora_request is not None:
            if adapter is not None:
                raise ValueError("give the adapter as lora_request or adapter, not both")
            adapter = [self._lora(r) for r in _per_prompt(
                lora_request, len(batch), "lora_request", (LoRARequest, type(None)))]
        adapters = _per_prompt(adapter, len(batch), "adapter", (str, type(None)))
        prepared = [self._prepare(p, a, s) for p, a, s in zip(batch, adapters, params,
                                                               strict=True)]
        rids = [self._submit(*prep, prompt=p if isinstance(p, str) else None)
                for prep, p in zip(prepared, batch, strict=True)]
        while any(rid in self._live for rid in rids):
            self.step()
        return [self._done.pop(rid) for rid in rids]

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None, *,
             adapter: str | None | Sequence[str | None] = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[Output]:
        """vLLM's `LLM.chat`: one conversation (a list of {"role", "content"} dicts) or a
        list of them, rendered with the tokenizer's chat template (or `chat_template`),
        then generated as `generate` does."""
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise TypeError("messages must be a non-empty list of {'role', 'content'} dicts, "
                            f"or a list of such lists; got {type(messages).__name__}")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [self.render_chat(c, chat_template, add_generation_prompt) for c in convs]
        return self.generate(prompts, sampling_params, lora_request, adapter=adapter)

    def render_chat(self, conversation: Sequence[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The prompt text of a conversation (and the tools it may call, in OpenAI's form)
        under the chat template."""
        if any(not isinstance(m, dict) for m in conversation):
            raise TypeError("each conversation must be a list of {'role', 'content'} dicts")
        tok = self.tokenizer
        if tok is None or not (chat_template or getattr(tok, "chat_template", None)):
            raise ValueError("this model has no chat template (tokenizer_config.json "
                             "chat_template)")
        return tok.apply_chat_template(list(conversation), chat_template=chat_template,
                                       add_generation_prompt=add_generation_prompt,
                                       tools=tools, tokenize=False)

    def _lora(self, request: LoRARequest | None) -> str | None:
        """The adapter name of a `LoRARequest`, loading its directory the first time."""
        if request is None:
            return None
        name = request.lora_name
        known = self._lora_ids.setdefault(request.lora_int_id, name)
        if known != name:
            raise ValueError(f"lora_int_id {request.lora_int_id} is already adapter "
                             f"{known!r}; give {name!r} another id")
        path = self.mover.adapter_paths.get(name)
        if path is None:
            self.add_adapter(name, request.lora_path)
        elif request.lora_path and Path(request.lora_path).resolve() != path.resolve():
            raise ValueError(f"adapter {name!r} is already loaded from {path}, not "
                             f"{request.lora_path}")
        return name


def _prompt_list(prompts) -> list[Prompt]:
    """One prompt or a batch of them as a list of text / token-id prompts."""
    def one(p) -> Prompt:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                return list(p["prompt_token_ids"])
            if isinstance(p.get("prompt"), str):
                return p["prompt"]
        elif isinstance(p, str) or (isinstance(p, Sequence) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p)):
            return p
        raise TypeError("a prompt must be a str, a list of token ids, or a dict with "
                        f"'prompt' or 'prompt_token_ids'; got {p!r:.80}")

    if isinstance(prompts, str | dict) or (isinstance(prompts, Sequence) and len(prompts) > 0
                                           and isinstance(prompts[0], int)):
        return [one(prompts)]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a prompt or a list of prompts, got "
                        f"{type(prompts).__name__}")
    return [one(p) for p in prompts]


def _per_prompt(value, n: int, name: str, scalar: tuple[type, ...]) -> list:
    if isinstance(value, scalar):
        return [value] * n
    expected = " or ".join("None" if t is type(None) else t.__name__ for t in scalar)
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be {expected}, or a list of them (one per prompt); "
                        f"got {type(value).__name__} {value!r:.60}")
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} {name} values for {n} prompts; give one, or one "
                         "per prompt")
    bad = [v for v in values if not isinstance(v, scalar)]
    if bad:
        raise TypeError(f"{name} must be {expected}, or a list of them; got "
                        f"{type(bad[0]).__name__} {bad[0]!r:.60}")
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
    """An asyncio front for `LLM`, with the engine stepping on its own thread.

        event loop ──call(fn)──► calls queue ──► engine thread: run calls, then step
        event loop ◄──deltas──── per-request asyncio.Queue (call_soon_threadsafe)

    Every touch of the `LLM` happens on the engine thread, between steps, so HTTP handlers
    never block behind a forward pass and never race the scheduler. A stream closed early
    (client gone, `aclose`) aborts its request: its blocks are free within one step."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.on_finish: list[Callable[[Output], None]] = []
        """Called on the engine thread with each finished request's `Output`."""
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="fastlibra-engine", daemon=True)
        self._thread.start()

    # -- calls onto the engine thread ---------------------------------------------------
    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run `fn(*args)` on the engine thread before its next step."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine thread has stopped")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, args, fut))
        return fut

    async def run(self, fn: Callable, *args):
        return await asyncio.wrap_future(self.call(fn, *args))

    def close(self) -> None:
        """Abort whatever runs and stop the engine thread."""
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join()

    # -- requests -----------------------------------------------------------------------
    async def add_request(self, prompt: Prompt, adapter: str | None = None,
                          sampling: SamplingParams | None = None,
                          request_id: str | None = None) -> str:
        """Queue a request; its deltas wait for `stream(id)`. Raises as `LLM.add_request`
        does (unknown adapter, prompt too long, ...) before anything is queued."""
        rid = request_id if request_id is not None else f"areq-{next(self._ids)}"
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already running")
        self._streams[rid] = (asyncio.get_running_loop(), asyncio.Queue())
        try:
            return await self.run(self.llm.add_request, prompt, adapter, sampling, rid)
        except BaseException:
            self._streams.pop(rid, None)
            raise

    async def stream(self, request_id: str) -> AsyncIterator[Delta]:
        """The deltas of a queued request; the last has `finish_reason` and `output`."""
        _, q = self._streams[request_id]
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if finished:
                self._streams.pop(request_id, None)
            else:
                self.release(request_id)

    def release(self, request_id: str) -> None:
        """Nobody will read this request any more: abort it if it still runs (on the
        engine thread, before its next step) and forget its stream. Does not wait."""
        self._streams.pop(request_id, None)
        if self._thread.is_alive():
            self.call(self._abort, request_id)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def generate_stream(self, prompt: Prompt, adapter: str | None = None,
                              sampling: SamplingParams | None = None,
                              request_id: str | None = None) -> AsyncIterator[Delta]:
        rid = await self.add_request(prompt, adapter, sampling, request_id)
        async for delta in self.stream(rid):
            yield delta

    async def abort(self, request_id: str) -> bool:
        """Stop a request; its blocks are free when this returns and its stream ends with
        finish_reason "abort". False if it was not running."""
        return await self.run(self._abort, request_id)

    # -- the engine thread --------------------------------------------------------------
    def _abort(self, request_id: str) -> bool:
        delta = self.llm.abort(request_id)
        if delta is not None:
            self._deliver([delta])
        return delta is not None

    def _deliver(self, deltas: list[Delta]) -> None:
        for d in deltas:
            if d.finish_reason is not None:
                d.output = self.llm.take_output(d.request_id)
                for hook in self.on_finish:
                    hook(d.output)
            target = self._streams.get(d.request_id)
            if target is not None:
                self._send(target, d if d.error is None else d.error)

    @staticmethod
    def _send(target, item) -> None:
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def _run(self) -> None:
        while True:
            try:
                item = self._calls.get(block=not self.llm.has_unfinished)
            except queue.Empty:
                item = ()
            while item != ():
                if item is None:
                    self._shutdown()
                    return
                fn, args, fut = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as e:  # handed to the caller
                        fut.set_exception(e)
                try:
                    item = self._calls.get_nowait()
                except queue.Empty:
                    item = ()
            if self.llm.has_unfinished:
                try:
                    self._deliver(self.llm.step())
                except Exception as e:  # fail the requests in flight, keep serving
                    self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        """The engine itself is broken. `LLM.step` ends a single request's failures (its
        adapter's read, its forward pass, its logits, its draw) itself, so what escapes
        it is the step's own bookkeeping (scheduler, cache books, a KV copy between
        arenas, block tables the model runner refuses), after which no request's state
        can be trusted: every request in flight fails with it, and the traceback goes
        to the log."""
        log.error("engine step failed; failing %d requests in flight",
                  len(self.llm.unfinished_ids), exc_info=error)
        for rid in self.llm.unfinished_ids:
            self.llm.abort(rid)
            self.llm.take_output(rid)
            target = self._streams.get(rid)
            if target is not None:
                self._send(target, error)

    def _shutdown(self) -> None:
        for rid in self.llm.unfinished_ids:
            self._abort(rid)
        self.llm.close()
