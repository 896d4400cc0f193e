"""Configuration: one frozen dataclass per concern, validated when built.

`ModelShape` and `LoraShape` turn architecture numbers into bytes, `HardwareProfile`
turns bytes and tokens into seconds, and `CacheConfig` fixes the pools. Everything below
the CLI receives these objects, never loose keyword arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A configuration value is out of range; the message says which and what to change."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that size its KV cache and adapters."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    dtype_bytes: int = 2
    head_dim: int = 0
    """Per-head width; 0 means hidden_size // num_heads."""
    num_params: int = 0
    """Parameter count (embedding and output projection included), for weight memory;
    0 means estimated from the shape."""
    vocab_size: int = 0
    """0: unknown, and every parameter is charged to every token (no separate logits)."""
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                  "intermediate_size", "dtype_bytes"):
            _require(getattr(self, f) > 0, f"ModelShape.{f} must be positive")
        _require(self.num_heads % self.num_kv_heads == 0,
                 "ModelShape.num_heads must be a multiple of num_kv_heads (GQA groups)")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _require(self.vocab_size >= 0, "ModelShape.vocab_size must be >= 0")
        vocab = self.vocab_params
        if self.num_params == 0:
            attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
            mlp = 3 * self.hidden_size * self.intermediate_size
            norms = (2 * self.num_layers + 1) * self.hidden_size
            object.__setattr__(self, "num_params",
                               self.num_layers * (attn + mlp) + norms + vocab)
        _require(self.num_params > vocab, f"ModelShape.num_params ({self.num_params}) must "
                 f"exceed the embedding and output projection ({vocab})")

    @property
    def head_params(self) -> int:
        """The output projection: computed once per sequence in a step (the logits of its
        last token), not once per token; 0 when the vocabulary is unknown."""
        return self.vocab_size * self.hidden_size

    @property
    def vocab_params(self) -> int:
        """The embedding and the output projection (one matrix when tied)."""
        return self.head_params * (1 if self.tied_embeddings else 2)

    @property
    def body_params(self) -> int:
        """What every token multiplies through: all parameters but the embedding (a row
        gather, no FLOPs) and the output projection."""
        return self.num_params - self.vocab_params

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def projection_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA target module."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        dims = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if module not in dims:
            raise ConfigError(f"unknown LoRA target module {module!r}; use one of {LORA_TARGETS}")
        return dims[module]


@dataclass(frozen=True)
class LoraShape:
    """Rank and target modules of an adapter: enough to know its size in bytes."""

    rank: int
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        _require(self.rank > 0, "LoraShape.rank must be positive")
        _require(len(self.target_modules) > 0, "LoraShape.target_modules must not be empty")
        for m in self.target_modules:
            _require(m in LORA_TARGETS, f"unknown LoRA target module {m!r}; use {LORA_TARGETS}")

    def nbytes(self, model: ModelShape) -> int:
        """A (rank x in) and B (out x rank) for every target module of every layer."""
        per_layer = 0
        for m in self.target_modules:
            fan_in, fan_out = model.projection_dims(m)
            per_layer += self.rank * (fan_in + fan_out)
        return model.num_layers * per_layer * self.dtype_bytes


@dataclass(frozen=True)
class HardwareProfile:
    """Seconds per byte moved and per token computed. Later issues fill it by measurement.

    Prefill of `n` new tokens after a cached prefix of `p` tokens costs
    `prefill_base + n * prefill_per_token + n * (p + n / 2) * prefill_per_token_pair`:
    a fixed launch cost, the linear (weights) part and the attention part that grows with
    the prefix.
    """

    name: str = "generic"
    h2d_bandwidth: float = 25e9
    """Host to device copy, bytes/s (PCIe)."""
    d2h_bandwidth: float = 25e9
    """Device to host copy, bytes/s."""
    disk_bandwidth: float = 2e9
    """Adapter file read, bytes/s."""
    adapter_parse_s: float = 0.005
    """Fixed cost to open and parse an adapter file."""
    prefill_base: float = 0.005
    prefill_per_token: float = 1e-4
    prefill_per_token_pair: float = 1e-9

    def __post_init__(self) -> None:
        for f in ("h2d_bandwidth", "d2h_bandwidth", "disk_bandwidth"):
            _require(getattr(self, f) > 0, f"HardwareProfile.{f} must be positive")
        for f in ("adapter_parse_s", "prefill_base", "prefill_per_token", "prefill_per_token_pair"):
            _require(getattr(self, f) >= 0, f"HardwareProfile.{f} must not be negative")

    def prefill_time(self, new_tokens: int, prefix_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        return (self.prefill_base + new_tokens * self.prefill_per_token
                + new_tokens * (prefix_tokens + new_tokens / 2) * self.prefill_per_token_pair)

    def h2d_time(self, nbytes: int) -> float:
        return nbytes / self.h2d_bandwidth

    def disk_load_time(self, nbytes: int) -> float:
        return self.adapter_parse_s + nbytes / self.disk_bandwidth


@dataclass(frozen=True)
class SwapperConfig:
    """When the swapper moves nodes between tiers (fractions of device capacity)."""

    high_watermark: float = 0.95
    """Above this device usage the swapper frees blocks (swap-out) between steps."""
    low_watermark: float = 0.80
    """Below this device usage the swapper prefetches host nodes (swap-in)."""
    max_prefetch_blocks: int = 256
    """Upper bound on blocks prefetched per tick, so one tick never floods the copy queue."""

    def __post_init__(self) -> None:
        _require(0 < self.low_watermark <= self.high_watermark <= 1,
                 "SwapperConfig needs 0 < low_watermark <= high_watermark <= 1")
        _require(self.max_prefetch_blocks >= 0, "SwapperConfig.max_prefetch_blocks must be >= 0")


@dataclass(frozen=True)
class CacheConfig:
    """Pools of one engine: block size and capacity per tier, and the cost-model knobs."""

    model: ModelShape
    device_blocks: int
    host_blocks: int
    block_size: int = 16
    """Tokens of KV per block (all layers)."""
    hardware: HardwareProfile = field(default_factory=HardwareProfile)
    swapper: SwapperConfig = field(default_factory=SwapperConfig)
    adapters_in_host: bool = True
    """The starting state, the same for every policy: adapters are read into host memory
    when registered, before serving (as far as the host holds them), or, when False, every
    policy reads each adapter from disk on first use through the same load path."""
    host_adapter_blocks: int | None = None
    """The most host blocks adapters may hold (vLLM's `max_cpu_loras`, in blocks); beyond
    it the lowest-ranked host adapter goes back to its file. None = the policy's rule."""
    decay_half_life_s: float = 15.0
    """Starting half-life of a node's visit frequency (recency and frequency in one
    number), for KV and for adapters alike; the cost model then learns each from its kind's
    reuse gaps (`cost.py`), since short lives suit bursts (agent) and long ones chat turns
    and the tail of adapter popularity."""

    def __post_init__(self) -> None:
        _require(self.block_size > 0, "CacheConfig.block_size must be positive (tokens per block)")
        _require(self.device_blocks > 0,
                 f"CacheConfig.device_blocks must be positive, got {self.device_blocks}; "
                 "give the device pool at least one block")
        _require(self.host_blocks >= 0,
                 f"CacheConfig.host_blocks must not be negative, got {self.host_blocks}")
        _require(self.decay_half_life_s > 0, "CacheConfig.decay_half_life_s must be positive")
        _require(self.host_adapter_blocks is None or self.host_adapter_blocks >= 0,
                 "CacheConfig.host_adapter_blocks must not be negative")

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.model.kv_bytes_per_token

    def blocks_for_bytes(self, nbytes: int) -> int:
        return max(1, math.ceil(nbytes / self.block_bytes))

    def blocks_for_tokens(self, ntokens: int) -> int:
        return -(-ntokens // self.block_size)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits, the same for every runner."""

    max_num_seqs: int = 256
    """Running requests at most (decode batch size)."""
    max_batched_tokens: int = 8192
    """Tokens computed per step (decode tokens + prefill chunk tokens)."""
    chunked_prefill: bool = True
    """Split long prompts over steps so decodes keep flowing; False = whole prompts only."""
    copy_join_s: float = 0.001
    """A prefill whose copies (adapter, cached KV) are due within this many seconds joins
    the step, and the runner waits for them before the forward pass; one due later sits
    out the step while others run. The real runner copies whole blocks before a step (no
    per-layer waits), and the simulator charges exactly that. A swap-in of a few KV blocks
    takes microseconds; a step, milliseconds."""
    max_loras: int | None = None
    """Distinct adapters at most among running requests (vLLM's `max_loras`: the base
    model does not count); a queued request whose adapter would exceed it is passed
    over, and the requests behind it may start. None = no limit."""

    def __post_init__(self) -> None:
        _require(self.max_num_seqs > 0, "SchedulerConfig.max_num_seqs must be positive")
        _require(self.max_batched_tokens > 0,
                 "SchedulerConfig.max_batched_tokens must be positive")
        _require(self.max_loras is None or self.max_loras > 0,
                 f"SchedulerConfig.max_loras must be positive, got {self.max_loras}")
