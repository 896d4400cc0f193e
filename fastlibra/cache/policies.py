"""Cache policies side by side: what each system does with adapters and KV.

A policy is a handful of traits plus a ranking key; the manager and swapper read the
traits, so the core has no `if policy == ...` chains.

| policy          | adapters                 | KV reuse | dependency | host tier              | ranking |
|-----------------|--------------------------|----------|------------|------------------------|---------|
| fastlibra       | unified pool             | tree     | yes        | adapters + KV          | cost    |
| fastlibra-nodep | unified pool             | tree     | no         | adapters + KV          | cost    |
| fastlibra-lru   | unified pool             | tree     | yes        | adapters + KV          | LRU     |
| vllm            | static share, LRU slots  | prefix   | no         | adapters (max_loras)   | LRU     |
| vllm-offload    | as vllm                  | prefix   | no         | + KV, write-through    | LRU     |
| sglang          | static share, LRU        | radix    | no         | adapters               | LRU     |
| sglang-hicache  | as sglang                | radix    | no         | + KV, write-through    | LRU     |
| slora           | unified pool, on demand  | none     | n/a        | adapters               | LRU     |
| fastlibra-paper | unified pool             | tree     | yes        | adapters + KV          | Eval    |
| fastlibra-paper-no-{lora,transfer,visit,recency} | as fastlibra-paper, one Eval term off | | | | |

Every policy starts from the same state (adapters in host memory, `CacheConfig.
adapters_in_host`) with the same budgets. What each baseline models and leaves out is in
docs/baselines.md.

vLLM v1 reserves `max_loras` adapter slots up front (the paper configured 20 % of memory),
keeps a CPU LRU of `max_cpu_loras` adapters (default: `max_loras`), loads adapters inside
the step, and skips a request whose adapter finds no free slot; its prefix cache hashes the
adapter id into each block, and nothing frees a block because its adapter left: that KV
stays until LRU reaches it. With its CPU offloading connector (or LMCache) KV blocks are
also stored to host memory as they are computed. SGLang sizes a LoRA memory pool for
`max_loras_per_batch` adapters (expressed here as the same device share, so the two differ
only in KV handling) beside a per-adapter radix cache with LRU leaf eviction; HiCache adds
a host tier written through. S-LoRA pages adapters and KV in one unified pool but frees a
request's KV when it ends. `fastlibra-paper` is the paper's own Eval
(`cache/paper_eval.py`), re-scored every 100 ms, on the same pool, tree and swapper as
`fastlibra`; its four ablations each turn one of Eval's terms off, as the paper's ablation
table does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from fastlibra.cache.cost import MECHANISMS, CostModel, lru_key
from fastlibra.cache.paper_eval import EvalTerms, PaperSwapper
from fastlibra.cache.pool import Tier
from fastlibra.cache.swapper import Swapper
from fastlibra.cache.tree import Node

RankKey = Callable[[CostModel, Node, Tier], tuple[int, float]]


def _cost_rank(cost: CostModel, node: Node, tier: Tier) -> tuple[int, float]:
    return cost.key(node, tier)


def _lru_rank(cost: CostModel, node: Node, tier: Tier) -> tuple[int, float]:
    return lru_key(node, tier)


@dataclass(frozen=True)
class Policy:
    name: str
    summary: str
    rank: RankKey | None
    """Lower key = evicted first, higher = prefetched first; changes only when a node does.
    None for a policy ranked by `eval_terms`."""
    dependency_aware: bool
    """I1 across the adapter -> KV edge: an adapter leaves a tier only after its KV."""
    reuse_kv: bool
    """Keep a finished request's KV for later requests."""
    host_kv: bool
    """KV may be swapped out to the host tier instead of dropped."""
    swapper: bool
    """Run the watermark swapper between steps (proactive swap-out and prefetch)."""
    adapter_share: float | None = None
    """Static share of device blocks reserved for adapters; None = one unified pool."""
    evict_blocks: bool = False
    """Evict single blocks (a node's tail first) rather than whole nodes, as vLLM's free
    block queue does; radix caches (SGLang) evict whole leaves."""
    host_adapters_as_slots: bool = False
    """The host keeps at most as many adapter blocks as the device's adapter slots hold:
    vLLM's CPU LoRA cache of `max_cpu_loras` adapters, which defaults to `max_loras`.
    Beyond it the least recently used host adapter goes back to its file."""
    copies_in_step: bool = False
    """Adapter loads and swap-ins run inside the step, so the whole batch waits for them
    (vLLM's LoRA manager loads adapters synchronously in the worker's step); otherwise a
    request whose copy is in flight sits out the steps until it lands while others run."""
    skip_without_adapter_slot: bool = False
    """Admission passes over a request whose adapter finds no free slot (every slot held by
    running requests) and admits the next, as vLLM v1's scheduler does; otherwise
    admission stops at the first request the cache cannot place."""
    cost_without: frozenset[str] = frozenset()
    """Cost-model mechanisms switched off (`cost.MECHANISMS`), to measure what each pays."""
    write_through: bool = False
    """KV is copied to the host tier when it is written (SGLang HiCache, vLLM's CPU
    offloading connector, LMCache), so evicting it to host frees its device blocks at
    once; otherwise a swap-out's blocks are reusable only when its copy is done."""

    eval_terms: EvalTerms | None = None
    """Rank by the paper's Eval with these terms (`cache/paper_eval.py`), re-scored every
    100 ms, instead of by `rank`."""

    @property
    def swapper_class(self) -> type[Swapper]:
        return Swapper if self.eval_terms is None else PaperSwapper

    @property
    def ranks_by_decay(self) -> bool:
        """The ranking reads the cost model's decay rate, so its keys go stale when the
        half-life adapts; LRU keys do not, and are left exactly as they were."""
        return self.rank is _cost_rank

    def __post_init__(self) -> None:
        if self.adapter_share is not None and not 0 < self.adapter_share < 1:
            raise ValueError(f"policy {self.name}: adapter_share must be in (0, 1)")
        if (self.rank is None) == (self.eval_terms is None):
            raise ValueError(f"policy {self.name}: give exactly one of rank and eval_terms")


VLLM = Policy("vllm", "vLLM v1: max_loras slots (20% share), max_cpu_loras = max_loras, "
              "loads in the step, prefix-cache LRU", _lru_rank, dependency_aware=False,
              reuse_kv=True, host_kv=False, swapper=False, adapter_share=0.2,
              evict_blocks=True, host_adapters_as_slots=True, copies_in_step=True,
              skip_without_adapter_slot=True)
SGLANG = Policy("sglang", "static LoRA pool, per-adapter radix cache with LRU leaf eviction",
                _lru_rank, dependency_aware=False, reuse_kv=True, host_kv=False, swapper=False,
                adapter_share=0.2)
_PAPER_VARIANTS = [
    ("", "the paper's Eval (LoRA_Eval x transfer x visit x recency), re-scored every 100 ms",
     EvalTerms()),
    *((f"-no-{term}", f"fastlibra-paper without Eval's {term} term (ablation)",
       EvalTerms(**{term: False})) for term in ("lora", "transfer", "visit", "recency")),
]

POLICIES: dict[str, Policy] = {
    p.name: p
    for p in [
        Policy("fastlibra", "unified pool, dependency tree, cost-model swapper",
               _cost_rank, dependency_aware=True, reuse_kv=True, host_kv=True, swapper=True),
        Policy("fastlibra-nodep", "fastlibra without the dependency rule (ablation)",
               _cost_rank, dependency_aware=False, reuse_kv=True, host_kv=True, swapper=True),
        Policy("fastlibra-lru", "fastlibra with LRU instead of the cost model (ablation)",
               _lru_rank, dependency_aware=True, reuse_kv=True, host_kv=True, swapper=True),
        VLLM,
        replace(VLLM, name="vllm-offload", host_kv=True, write_through=True,
                summary="vllm plus an LRU CPU KV tier written through (offloading connector)"),
        SGLANG,
        replace(SGLANG, name="sglang-hicache", host_kv=True, write_through=True,
                summary="sglang plus HiCache: a host KV tier written through, LRU"),
        Policy("slora", "unified pool, adapters on demand (LRU), no KV reuse across requests",
               _lru_rank, dependency_aware=False, reuse_kv=False, host_kv=False, swapper=False),
        *(Policy(f"fastlibra-paper{suffix}", summary, None, dependency_aware=True,
                 reuse_kv=True, host_kv=True, swapper=True, eval_terms=terms)
          for suffix, summary, terms in _PAPER_VARIANTS),
    ]
}

BASELINES = ("vllm", "vllm-offload", "slora", "sglang", "sglang-hicache")
ABLATIONS = ("fastlibra-nodep", "fastlibra-lru")
PAPER_POLICIES = tuple(f"fastlibra-paper{suffix}" for suffix, _, _ in _PAPER_VARIANTS)


def get_policy(name: str, adapter_share: float | None = None) -> Policy:
    """Look a policy up by name; `adapter_share` overrides a static policy's share.
    `NAME~m1~m2` is NAME with cost-model mechanisms m1, m2 switched off (`cost.MECHANISMS`),
    e.g. `fastlibra~ghosts`."""
    base, *without = name.split("~")
    try:
        policy = POLICIES[base]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
    if without:
        if not policy.ranks_by_decay:
            raise ValueError(f"policy {base!r} does not rank by the cost model; "
                             "its mechanisms cannot be switched off")
        unknown = set(without) - set(MECHANISMS)
        if unknown:
            raise ValueError(f"unknown cost-model mechanism(s) {sorted(unknown)} in {name!r}; "
                             f"choose from {', '.join(MECHANISMS)}")
        policy = replace(policy, name=name, cost_without=frozenset(without))
    if adapter_share is not None:
        if policy.adapter_share is None:
            raise ValueError(f"policy {name!r} has one unified pool; adapter_share does not apply")
        policy = replace(policy, adapter_share=adapter_share)
    return policy
