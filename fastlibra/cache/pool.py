"""Fixed-capacity block pools, one per memory tier (or per static region).

A pool only allocates, frees and counts; it makes no decision about what to evict.
Every block has exactly one owner kind while allocated:

    block ids   0 1 2 3 4 5 6 7 ...  capacity-1
    owner       A A K K R . . K ...  (A adapter, K cached KV, R running KV, . free)

The owner array lets `check()` prove that no block is free twice or owned twice.
"""

from __future__ import annotations

from enum import Enum


class Tier(Enum):
    """Where a node's bytes live. DISK is the adapter file: not a pool, never KV."""

    __hash__ = object.__hash__  # members are singletons; Enum's own hash runs Python code

    DEVICE = 0
    HOST = 1
    DISK = 2


class BlockKind(Enum):
    __hash__ = object.__hash__  # see Tier

    ADAPTER = "adapter"
    KV_CACHED = "kv_cached"
    KV_RUNNING = "kv_running"


class PoolExhausted(RuntimeError):
    """Asked for more free blocks than the pool has; the caller evicts first."""


class BlockPool:
    """A free list over `capacity` block ids of one tier."""

    def __init__(self, name: str, tier: Tier, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"pool {name!r}: capacity must be >= 0, got {capacity}")
        self.name = name
        self.tier = tier
        self.capacity = capacity
        # Pop from the end: lowest ids are handed out first, which keeps tests readable.
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._owner: list[BlockKind | None] = [None] * capacity
        self._used = dict.fromkeys(BlockKind, 0)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def used(self, kind: BlockKind) -> int:
        return self._used[kind]

    def usage(self) -> dict[str, int]:
        """Blocks per owner kind plus free, for metrics and plots."""
        out = {k.value: v for k, v in self._used.items()}
        out["free"] = self.num_free
        return out

    def allocate(self, n: int, kind: BlockKind) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(
                f"pool {self.name!r}: need {n} blocks, {len(self._free)} free of {self.capacity}")
        if n <= 0:
            return []
        blocks = self._free[-n:]
        del self._free[-n:]
        blocks.reverse()
        for b in blocks:
            self._owner[b] = kind
        self._used[kind] += n
        return blocks

    def free(self, blocks: list[int]) -> None:
        owner = self._owner
        for b in blocks:
            kind = owner[b]
            if kind is None:
                raise RuntimeError(f"pool {self.name!r}: block {b} freed twice")
            owner[b] = None
            self._used[kind] -= 1
        self._free.extend(reversed(blocks))

    def retag(self, blocks: list[int], kind: BlockKind) -> None:
        """Hand blocks to another owner kind without copying (running KV becomes cached)."""
        owner = self._owner
        for b in blocks:
            old = owner[b]
            if old is None:
                raise RuntimeError(f"pool {self.name!r}: block {b} is free, cannot retag")
            self._used[old] -= 1
            self._used[kind] += 1
            owner[b] = kind

    def owner(self, block: int) -> BlockKind | None:
        return self._owner[block]

    def check(self) -> None:
        """free + used == capacity, and the free list and owner array agree."""
        assert len(set(self._free)) == len(self._free), f"{self.name}: duplicate free block"
        for b in self._free:
            assert self._owner[b] is None, f"{self.name}: free block {b} has an owner"
        counted = dict.fromkeys(BlockKind, 0)
        for o in self._owner:
            if o is not None:
                counted[o] += 1
        assert counted == self._used, f"{self.name}: usage {self._used} != owners {counted}"
        assert sum(counted.values()) + len(self._free) == self.capacity, f"{self.name}: leak"
