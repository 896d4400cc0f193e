"""Model shapes and GPU data sheets, and the step-time model built from them.

A step that computes `T` tokens (prefill chunks and one token per decoding request)
costs the larger of its compute time and its memory time (a smooth maximum on a CPU,
`GpuSpec.roofline_p`), plus LoRA, tensor-parallel
communication and a fixed per-step overhead (S = sequences in the step: only each
sequence's last token computes logits; the embedding is a row gather):

    compute = (2 * (body params * T + output projection * S) + attention FLOPs)
              / (tp * peak FLOP/s * MFU)
    memory  = (weights but the embedding + KV read) / (tp * HBM bandwidth)
    lora    = per distinct adapter: its weights read once + a kernel launch
    comm    = 2 all-reduces per layer over NVLink when tp > 1

Prefill attention grows with the prefix (each new token attends to everything before
it); decode memory grows with batch and context (each step reads every KV). A runner
with padded attention (`GpuSpec.padded_attention`: our dense SDPA on CPU) computes every
sequence of a mixed batch as if it had the longest query and the longest context.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from fastlibra.config import ConfigError, HardwareProfile, LoraShape, ModelShape

GiB = 1 << 30

MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in [
        ModelShape("llama-2-7b", num_layers=32, hidden_size=4096, num_heads=32,
                   num_kv_heads=32, intermediate_size=11008, num_params=6_738_000_000,
                   vocab_size=32000),
        ModelShape("llama-3-8b", num_layers=32, hidden_size=4096, num_heads=32,
                   num_kv_heads=8, intermediate_size=14336, num_params=8_030_000_000,
                   vocab_size=128256),
        ModelShape("llama-2-13b", num_layers=40, hidden_size=5120, num_heads=40,
                   num_kv_heads=40, intermediate_size=13824, num_params=13_016_000_000,
                   vocab_size=32000),
        ModelShape("codellama-34b", num_layers=48, hidden_size=8192, num_heads=64,
                   num_kv_heads=8, intermediate_size=22016, num_params=33_744_000_000,
                   vocab_size=32000),
        ModelShape("llama-3-70b", num_layers=80, hidden_size=8192, num_heads=64,
                   num_kv_heads=8, intermediate_size=28672, num_params=70_554_000_000,
                   vocab_size=128256),
    ]
}


STEP_OVERHEAD_S = 1.5e-3
"""Scheduling, sampling and launch overhead of one engine step."""
PER_SEQ_OVERHEAD_S = 8e-6
LORA_LAUNCH_S = 20e-6
"""Extra kernel launches per distinct adapter in a batch (SGMV segment setup)."""
ADAPTER_PARSE_S = 0.005
"""Fixed cost to open and parse an adapter file."""


@dataclass(frozen=True)
class GpuSpec:
    """Data-sheet numbers (dense BF16) and the links around one GPU."""

    name: str
    hbm_bytes: int
    flops: float
    hbm_bandwidth: float
    pcie_bandwidth: float
    """Effective host<->device copy bandwidth per GPU, bytes/s (pinned memory)."""
    nvlink_bandwidth: float
    disk_bandwidth: float = 2.0e9
    mfu: float = 0.6
    """Fraction of peak FLOP/s reached by large GEMMs."""
    mbu: float = 0.8
    """Fraction of peak HBM bandwidth reached by streaming reads."""
    step_overhead_s: float = STEP_OVERHEAD_S
    per_seq_overhead_s: float = PER_SEQ_OVERHEAD_S
    lora_launch_s: float = LORA_LAUNCH_S
    adapter_parse_s: float = ADAPTER_PARSE_S
    """Overrides for measured profiles (`fastlibra.bench.fidelity`); GPUs keep the defaults."""
    padded_attention: bool = False
    """Attention runs on the batch padded to [seqs, longest query, longest context]
    (fastlibra's own runner: one dense SDPA call per layer); GPUs run varlen kernels."""
    roofline_p: float | None = None
    """How compute and memory time combine: None = the larger of the two (a GPU streams
    weights while its tensor cores work); p = (compute^p + memory^p)^(1/p), which is
    that max once either side dominates but more than it where they meet. A CPU core that
    both streams and multiplies pays at that knee (a 16-token prefill here: 13.6 ms, where
    max() says 11.2), so `fidelity` fits p for the `cpu` profile."""
    idle_wake_s: float = 0.0
    """Extra seconds of the first step after the engine sat idle: on a CPU the caches and
    clocks go cold in a pause of tens of milliseconds (measured by `fidelity`: 0.7-2.6 ms
    per step here). GPUs keep 0."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "name":
                _check(isinstance(v, str) and v, "GpuSpec.name must be a non-empty string")
            elif f.name == "padded_attention":
                _check(isinstance(v, bool), "GpuSpec.padded_attention must be true or false")
            elif not (f.name == "roofline_p" and v is None):
                _check(isinstance(v, int | float) and not isinstance(v, bool)
                       and math.isfinite(v), f"GpuSpec.{f.name} must be a number, got {v!r}")
                _check(f.name in _FITTED_OFFSETS or v > 0,
                       f"GpuSpec.{f.name} must be positive, got {v!r}")
        _check(self.mfu <= 1 and self.mbu <= 1, "GpuSpec.mfu and mbu are fractions of peak (<= 1)")
        _check(self.roofline_p is None or self.roofline_p >= 1, "GpuSpec.roofline_p must be >= 1")


_FITTED_OFFSETS = {"step_overhead_s", "per_seq_overhead_s", "lora_launch_s", "adapter_parse_s",
                   "idle_wake_s"}
"""Least-squares intercepts of a measured profile: any sign the fit gives."""
_GPU_REQUIRED = ("hbm_bytes", "flops", "hbm_bandwidth", "pcie_bandwidth", "nvlink_bandwidth")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in [
        GpuSpec("a100-80g", 80 * 10**9, 312e12, 2.039e12, 25e9, 300e9),
        GpuSpec("h100-80g", 80 * 10**9, 989e12, 3.35e12, 50e9, 450e9),
        GpuSpec("h800-80g", 80 * 10**9, 989e12, 3.35e12, 50e9, 200e9),
        GpuSpec("h200-141g", 141 * 10**9, 989e12, 4.8e12, 50e9, 450e9),
    ]
}

ALLREDUCE_LATENCY_S = 8e-6
ACTIVATION_RESERVE = 0.08
"""Share of HBM kept for activations, CUDA graphs and fragmentation."""


def attention_work(model: ModelShape, prefills: list[tuple[int, int]] | tuple,
                   decode_ctx_sum: int, num_decodes: int,
                   padded: bool = False) -> tuple[float, int]:
    """(attention FLOPs, KV tokens read) of one step at tp = 1. Ragged: each prefill chunk
    attends causally over its prefix, each decode over its context. Padded (more than one
    sequence): every sequence costs the longest query times the longest context; decode
    contexts enter by their mean (the step model sees only their sum)."""
    pair = 4 * model.num_layers * model.num_heads * model.head_dim
    seqs = len(prefills) + num_decodes
    if padded and seqs > 1:
        q_max = max((n for n, _ in prefills), default=1)
        l_max = max([p + n for n, p in prefills]
                    + ([decode_ctx_sum / num_decodes] if num_decodes else []))
        return pair * seqs * q_max * l_max, round(seqs * l_max)
    flops = sum(pair * n * (p + n / 2) for n, p in prefills) + pair * decode_ctx_sum
    return flops, decode_ctx_sum + sum(p + n for n, p in prefills)


def roofline(compute: float, memory: float, p: float | None) -> float:
    """Seconds of a step that needs `compute` and `memory` seconds (`GpuSpec.roofline_p`)."""
    if p is None:
        return max(compute, memory)
    top = max(compute, memory)
    if top <= 0:
        return 0.0
    return top * ((compute / top) ** p + (memory / top) ** p) ** (1 / p)


def weight_work(model: ModelShape, tokens: int, seqs: int) -> tuple[float, int]:
    """(GEMM FLOPs, weight bytes read) of a step computing `tokens` tokens of `seqs`
    sequences at tp = 1: every token goes through the decoder layers, one per sequence
    through the output projection; the embedding is gathered, not multiplied. (The two
    are 4 % of Llama-2 7B's parameters and 13 % of Llama-3 8B's: charging them to every
    prefill token overstated its compute by that much.)"""
    flops = 2 * (model.body_params * tokens + model.head_params * seqs)
    return flops, (model.body_params + model.head_params) * model.dtype_bytes


def resolve_gpu(spec: str) -> GpuSpec:
    """A GPU of the table, or a JSON file: either `GpuSpec` fields (`name` defaults to the
    file's stem) or the output of `fastlibra bench fidelity`, whose fitted `profile.spec`
    is this machine measured."""
    if spec in GPUS:
        return GPUS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"unknown hardware {spec!r}; choose from {', '.join(GPUS)}, or give "
                          "a JSON file of GpuSpec fields")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("profile"), dict) and "spec" in raw["profile"]:
        raw = raw["profile"]["spec"]
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of GpuSpec fields")
    known = [f.name for f in fields(GpuSpec)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}; "
                          f"GpuSpec has {', '.join(known)}")
    missing = [f for f in _GPU_REQUIRED if f not in raw]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}")
    try:
        return GpuSpec(**{"name": path.stem, **raw})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass(frozen=True)
class SimProfile:
    """One model served on `tp` GPUs of one kind."""

    model: ModelShape
    gpu: GpuSpec
    tp: int = 1
    lora: LoraShape = LoraShape(rank=32)

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ConfigError("--tp must be >= 1")
        if self.model.num_kv_heads % self.tp and self.tp % self.model.num_kv_heads:
            raise ConfigError(f"--tp {self.tp} does not divide {self.model.name}'s "
                              f"{self.model.num_kv_heads} KV heads")
        if self.free_hbm_bytes() <= 0:
            raise ConfigError(f"{self.model.name} does not fit on {self.tp} x {self.gpu.name}; "
                              "raise --tp")

    # -- memory -------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return self.model.num_params * self.model.dtype_bytes

    def free_hbm_bytes(self) -> int:
        """HBM left for the unified pool: all GPUs minus weights minus reserve."""
        total = self.gpu.hbm_bytes * self.tp
        return int(total * (1 - ACTIVATION_RESERVE) - self.weight_bytes)

    # -- time ---------------------------------------------------------------------------
    def step_time(self, prefills: list[tuple[int, int]], decode_ctx_sum: int, num_decodes: int,
                  num_adapters: int) -> float:
        """Seconds for one step: `prefills` = (new tokens, prefix tokens) per chunk,
        decode context summed over decoding requests, distinct LoRA adapters in the batch."""
        m, g, tp = self.model, self.gpu, self.tp
        tokens = sum(n for n, _ in prefills) + num_decodes
        if tokens == 0:
            return 0.0
        attn_flops, kv_tokens = attention_work(m, prefills, decode_ctx_sum, num_decodes,
                                               g.padded_attention)
        seqs = len(prefills) + num_decodes
        flops, streamed = weight_work(m, tokens, seqs)
        compute = (flops + attn_flops) / (tp * g.flops * g.mfu)
        memory = (streamed + kv_tokens * m.kv_bytes_per_token) / (tp * g.hbm_bandwidth * g.mbu)
        lora = 0.0
        if num_adapters:
            lora_bytes = self.lora.nbytes(m)
            lora_flops = 2 * tokens * lora_bytes / m.dtype_bytes
            lora = num_adapters * (g.lora_launch_s + lora_bytes / (tp * g.hbm_bandwidth * g.mbu))
            lora += lora_flops / (tp * g.flops * g.mfu)
        comm = 0.0
        if tp > 1:
            msg = tokens * m.hidden_size * m.dtype_bytes
            comm = 2 * m.num_layers * (ALLREDUCE_LATENCY_S
                                       + 2 * (tp - 1) / tp * msg / g.nvlink_bandwidth)
        overhead = g.step_overhead_s + g.per_seq_overhead_s * seqs
        return roofline(compute, memory, g.roofline_p) + lora + comm + overhead

    def prefill_time(self, new_tokens: int, prefix: int = 0) -> float:
        return self.step_time([(new_tokens, prefix)], 0, 0, 0)

    def kv_read_time(self) -> float:
        """Seconds a step spends reading one context token's KV for a decode."""
        m, g = self.model, self.gpu
        return m.kv_bytes_per_token / (self.tp * g.hbm_bandwidth * g.mbu)

    def hardware_profile(self) -> HardwareProfile:
        """The cost model's view of this setup, fitted to `step_time` so that both agree.

        Copies use every GPU's PCIe link in parallel (each holds 1/tp of a block)."""
        m, g, tp = self.model, self.gpu, self.tp
        base = self.prefill_time(1)
        n1, n2 = 512, 2048
        per_token = (self.prefill_time(n2) - self.prefill_time(n1)) / (n2 - n1)
        width = m.num_heads * m.head_dim
        pair = 4 * m.num_layers * width / (tp * g.flops * g.mfu)
        return HardwareProfile(
            name=f"{g.name}x{tp}", h2d_bandwidth=g.pcie_bandwidth * tp,
            d2h_bandwidth=g.pcie_bandwidth * tp, disk_bandwidth=g.disk_bandwidth,
            adapter_parse_s=g.adapter_parse_s, prefill_base=base,
            prefill_per_token=max(0.0, per_token - pair * (n1 + n2) / 2),
            prefill_per_token_pair=pair)
