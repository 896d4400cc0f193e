"""The dependency tree: base model -> adapters -> radix tree of KV per adapter.

    root (base model, always resident)
    ├── AdapterNode "sql"  gen 0       tier DEVICE, 9 blocks
    │   └── KVNode tokens[0:512]        tier DEVICE
    │       ├── KVNode tokens[512:640]  tier HOST
    │       └── KVNode tokens[512:768]  tier DEVICE
    └── AdapterNode "<base>"            requests without an adapter (0 blocks)

KV edges are whole blocks of tokens, so a node's blocks belong to it alone and a split
never copies. Children are keyed by their first block of tokens. The same tokens under two
adapters live under two adapter nodes: isolation is structural.

This module only shapes and walks the tree. Which tier a node is in, and moving it, is
the manager's job; the tree keeps, per node, how many children are resident in each tier
so that "is this a leaf of the device tier?" is O(1).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

from fastlibra.cache.pool import Tier

_ids = itertools.count(1)


@dataclass(eq=False, slots=True)
class Node:
    """Something cached: a base for its children, resident in one tier at a time."""

    parent: Node | None
    num_blocks: int = 0
    tier: Tier = Tier.DISK
    blocks: list[int] = field(default_factory=list)
    children: dict[tuple[int, ...], KVNode] = field(default_factory=dict)
    ref_count: int = 0
    """Running requests using this node or a descendant (I2: pinned while > 0)."""
    freq: float = 0.0
    """Visits, decayed exponentially, as of `t_last`."""
    t_last: float = 0.0
    visits: int = 0
    """Requests that used this node, undecayed (a new KV leaf counts the one that made it):
    the visit frequency of the paper's Eval (`cache/paper_eval.py`)."""
    demand: int = 0
    """Queued requests that will need this node."""
    resident_children: list[int] = field(default_factory=lambda: [0, 0, 0])
    """Children per tier index (DEVICE, HOST, DISK)."""
    ready_at: float = 0.0
    """When the last copy into this node's current tier completes."""
    heap_version: int = 0
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def pinned(self) -> bool:
        return self.ref_count > 0

    def children_in(self, tier: Tier) -> int:
        return self.resident_children[tier.value]


@dataclass(eq=False, slots=True)
class AdapterNode(Node):
    """One loaded adapter identity. Reloading a name makes a new node (new generation)."""

    name: str = ""
    generation: int = 0
    nbytes: int = 0
    retired: bool = False
    """Unloaded (or replaced): never matched again, dropped as soon as unpinned."""
    device_kv_blocks: int = 0
    """Blocks of this adapter's KV on device, to count invalid KV in O(1)."""

    @property
    def adapter(self) -> AdapterNode:
        return self

    @property
    def prefix_len(self) -> int:
        return 0

    @property
    def end(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"Adapter({self.name}#{self.generation}, {self.tier.name}, {self.num_blocks}b)"


@dataclass(eq=False, slots=True)
class KVNode(Node):
    """KV of `tokens`, which follow `prefix_len` tokens of its ancestors."""

    adapter: AdapterNode | None = None
    tokens: tuple[int, ...] = ()
    prefix_len: int = 0
    speculative: bool = False
    """A new leaf whose starting count rests on the learned floor, not on its parent's
    share; the cost model learns from whether it is ever reused (see `CostModel.inherit`)."""
    hashes: tuple[int, ...] = ()
    """Chained hashes of its blocks (`chain_hashes`), filled on the first export."""

    @property
    def end(self) -> int:
        """Prompt position just after this node's edge."""
        return self.prefix_len + len(self.tokens)

    def __repr__(self) -> str:
        a = self.adapter.name if self.adapter else "?"
        return f"KV({a}[{self.prefix_len}:{self.end}], {self.tier.name}, ref={self.ref_count})"


@dataclass(slots=True)
class Match:
    """Result of a prefix walk: the whole nodes matched, and where a partial edge ended."""

    nodes: list[KVNode]
    """Fully matched KV nodes, root-first."""
    partial: KVNode | None = None
    """Next node, matched only for its first `partial_blocks` blocks."""
    partial_blocks: int = 0

    @property
    def last(self) -> KVNode | None:
        return self.nodes[-1] if self.nodes else None


def walk(adapter: AdapterNode, tokens: tuple[int, ...], block_size: int,
         max_blocks: int) -> Match:
    """Longest cached prefix of `tokens` under `adapter`, in whole blocks, at most `max_blocks`."""
    nodes: list[KVNode] = []
    node: Node = adapter
    pos = 0
    limit = max_blocks * block_size
    while pos < limit:
        child = node.children.get(tokens[pos:pos + block_size])
        if child is None:
            break
        edge = child.tokens
        n = len(edge)
        if pos + n <= limit and tokens[pos:pos + n] == edge:
            nodes.append(child)
            pos += n
            node = child
            continue
        # Partial edge: count whole matching blocks (the first one matched via the key).
        k = 1
        while (pos + (k + 1) * block_size <= limit and (k + 1) * block_size <= n
               and tokens[pos + k * block_size:pos + (k + 1) * block_size]
               == edge[k * block_size:(k + 1) * block_size]):
            k += 1
        return Match(nodes, child, k)
    return Match(nodes)


def split(node: KVNode, keep_blocks: int, block_size: int) -> KVNode:
    """Cut `node` after `keep_blocks` blocks; return the new upper node.

    The upper node takes the first blocks (same tier, no copy) and inherits the node's
    pins and statistics, since every request through `node` also passes through it.
    """
    assert 0 < keep_blocks < node.num_blocks
    cut = keep_blocks * block_size
    parent = node.parent
    assert parent is not None
    upper = KVNode(parent=parent, num_blocks=keep_blocks, tier=node.tier,
                   blocks=node.blocks[:keep_blocks], ref_count=node.ref_count,
                   freq=node.freq, t_last=node.t_last, visits=node.visits,
                   demand=node.demand,
                   adapter=node.adapter, tokens=node.tokens[:cut], prefix_len=node.prefix_len,
                   speculative=node.speculative, hashes=node.hashes[:keep_blocks])
    node.hashes = node.hashes[keep_blocks:]
    node.speculative = False  # one leaf, one outcome: the upper part carries it
    parent.children[upper.tokens[:block_size]] = upper
    upper.children[node.tokens[cut:cut + block_size]] = node
    upper.resident_children[node.tier.value] += 1
    node.parent = upper
    node.tokens = node.tokens[cut:]
    node.prefix_len += cut
    node.blocks = node.blocks[keep_blocks:]
    node.num_blocks -= keep_blocks
    return upper


def attach(parent: Node, adapter: AdapterNode, tokens: tuple[int, ...], prefix_len: int,
           blocks: list[int], tier: Tier, block_size: int) -> KVNode:
    """New KV leaf under `parent`, already resident in `tier` with `blocks`."""
    node = KVNode(parent=parent, num_blocks=len(blocks), tier=tier, blocks=blocks,
                  adapter=adapter, tokens=tokens, prefix_len=prefix_len)
    key = tokens[:block_size]
    assert key not in parent.children, "attach over an existing edge"
    parent.children[key] = node
    parent.resident_children[tier.value] += 1
    return node


def detach(node: KVNode, block_size: int) -> None:
    """Remove a KV leaf from its parent (its blocks must already be freed)."""
    assert not node.children, "detach of a node with children"
    parent = node.parent
    assert parent is not None
    del parent.children[node.tokens[:block_size]]
    parent.resident_children[node.tier.value] -= 1


def set_tier(node: Node, tier: Tier) -> None:
    """Record a tier change, keeping the parent's resident-children counts right."""
    parent = node.parent
    if parent is not None:
        parent.resident_children[node.tier.value] -= 1
        parent.resident_children[tier.value] += 1
    node.tier = tier


def subtree(node: Node) -> list[KVNode]:
    """All KV descendants of `node`, parents before children."""
    out: list[KVNode] = []
    stack = list(node.children.values())
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.children.values())
    return out


def chain_root(adapter_name: str) -> int:
    """The hash every prefix chain of one adapter starts from ("" = the base model). Stable
    across processes (a router and its replicas hash alike), unlike `hash` of a str."""
    return int.from_bytes(hashlib.blake2b(adapter_name.encode(), digest_size=8).digest(),
                          "little", signed=True)


def chain_hashes(start: int, tokens: tuple[int, ...], block_size: int) -> list[int]:
    """Hash of each whole block of `tokens`, each one folding in the hash before it, so a
    block's hash names its whole prefix and its adapter: one set lookup answers "is this
    prefix cached?". `hash` of a tuple of ints does not depend on PYTHONHASHSEED."""
    out = []
    h = start
    for i in range(len(tokens) // block_size):
        h = hash((h, tokens[i * block_size:(i + 1) * block_size]))
        out.append(h)
    return out
