"""Tiny configs shared by the tests: every number here is small enough to draw.

    model "tiny": 1 layer, 1 KV head of width 4, fp16
    KV per token = 2 (K,V) x 1 layer x 1 head x 4 x 2 bytes = 16 bytes
    block        = 4 tokens = 64 bytes

Prompts are written in blocks: `blocks(1, 2, 3)` is the 12 tokens
(10 11 12 13 | 20 21 22 23 | 30 31 32 33), drawn in comments as [1][2][3].
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fastlibra.cache import CacheManager, Move
from fastlibra.cache.tree import AdapterNode
from fastlibra.config import CacheConfig, HardwareProfile, ModelShape, SwapperConfig

# Shared helpers live beside the tests that own them and serve other folders too:
# tinymodels and llmsetup (tests/model), simfixtures (tests/sim), liveserver (tests/server).
for _helpers in ("model", "sim", "server"):
    sys.path.insert(0, str(Path(__file__).parent / _helpers))

# Triton kernels run in its interpreter on CPU; it must be chosen before triton is imported.
if os.environ.get("FASTLIBRA_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

BS = 4
MODEL = ModelShape("tiny", num_layers=1, hidden_size=8, num_heads=2, num_kv_heads=1,
                   intermediate_size=16)
BLOCK_BYTES = BS * MODEL.kv_bytes_per_token  # 64


def blocks(*ids: int) -> tuple[int, ...]:
    """Whole blocks of prompt tokens: block `i` is the 4 tokens 10*i .. 10*i + 3."""
    return tuple(10 * i + j for i in ids for j in range(BS))


def adapter_bytes(nblocks: int) -> int:
    """An adapter size that fills exactly `nblocks` blocks."""
    return nblocks * BLOCK_BYTES


def make_cfg(device_blocks: int = 16, host_blocks: int = 8, *,
             high: float = 0.95, low: float = 0.80, max_prefetch_blocks: int = 256,
             hardware: HardwareProfile | None = None, half_life: float = 60.0,
             adapters_in_host: bool = False) -> CacheConfig:
    return CacheConfig(
        model=MODEL, device_blocks=device_blocks, host_blocks=host_blocks, block_size=BS,
        hardware=hardware or HardwareProfile(), adapters_in_host=adapters_in_host,
        swapper=SwapperConfig(high_watermark=high, low_watermark=low,
                              max_prefetch_blocks=max_prefetch_blocks),
        decay_half_life_s=half_life)


def make_manager(policy: str = "fastlibra", device_blocks: int = 16, host_blocks: int = 8, *,
                 mover=None, adapters: dict[str, int] | None = None,
                 adapters_in_host: bool = False, **cfg_kw) -> CacheManager:
    """A manager on a tiny config; `adapters` maps names to sizes in blocks. Adapters
    start on disk (not read into host at registration) unless `adapters_in_host`, so the
    pinned block ids below do not depend on each policy's start-up state."""
    m = CacheManager(make_cfg(device_blocks, host_blocks, adapters_in_host=adapters_in_host,
                              **cfg_kw), policy, mover=mover)
    for name, nblocks in (adapters or {}).items():
        m.register_adapter(name, adapter_bytes(nblocks))
    return m


@dataclass
class RecordingMover:
    """Records every move as (kind, what, src blocks, dst blocks, bytes); copies take `delay`."""

    delay: float = 0.0
    quoted_delay: float = 0.0
    """What `estimate` answers: the copy queue looks this busy when the cache asks."""
    log: list[Move] = field(default_factory=list)

    def submit(self, move: Move, now: float) -> float:
        self.log.append(move)
        return now + self.delay

    def estimate(self, kind, nbytes: int, now: float) -> float:
        return now + self.quoted_delay

    @property
    def moves(self) -> list[tuple[str, str, list[int], list[int], int]]:
        return [(mv.kind.value, repr(mv.node), list(mv.src_blocks), list(mv.dst_blocks),
                 mv.nbytes) for mv in self.log]

    def take_log(self) -> list[Move]:
        """The Move objects recorded so far; forgets them."""
        out = list(self.log)
        self.log.clear()
        return out

    def take(self) -> list[tuple[str, str, list[int], list[int], int]]:
        """The moves recorded so far; forgets them."""
        out = self.moves
        self.log.clear()
        return out


def label(tokens: tuple[int, ...]) -> str:
    """[1][2] for blocks(1, 2); a block that is not one of `blocks` shows as [?]."""
    out = []
    for i in range(0, len(tokens), BS):
        chunk = tokens[i:i + BS]
        out.append(f"[{chunk[0] // 10}]" if chunk == blocks(chunk[0] // 10) else "[?]")
    return "".join(out)


def tree(m: CacheManager, adapter=None) -> list[str]:
    """The KV under an adapter (a name, None for the base model, or an AdapterNode), one
    line per node, parents first, children indented and ordered by their first token:
    "[1][2] DEVICE [4, 5]" is the KV of blocks(1, 2) in device blocks 4 and 5; " pin=N"
    is added while N running requests use it."""
    out: list[str] = []

    def visit(node, depth: int) -> None:
        for key in sorted(node.children):
            c = node.children[key]
            pin = f" pin={c.ref_count}" if c.ref_count else ""
            out.append(f"{'  ' * depth}{label(c.tokens)} {c.tier.name} {c.blocks}{pin}")
            visit(c, depth + 1)

    visit(adapter if isinstance(adapter, AdapterNode) else m.adapter(adapter), 0)
    return out


def run(m: CacheManager, rid: str, adapter: str | None, tokens, now: float = 0.0,
        computed=None):
    """Allocate and free one request at once (its KV joins the tree), checking invariants."""
    alloc = m.allocate(rid, adapter, tokens, now)
    assert alloc is not None, f"{rid} was deferred"
    m.check_invariants()
    m.free(alloc, computed, now)
    m.check_invariants()
    return alloc


@pytest.fixture
def recorder() -> RecordingMover:
    return RecordingMover()
