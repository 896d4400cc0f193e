"""The model runner's kernel path: per-adapter slot tables kept on the device, and the
metadata of one step built once (one upload) and read by every layer's launches.

    LoraSlots (device, written when an adapter lands in the arena, not per step):
        offsets [layers, 7 modules, 2 (A, B^T), slots, R] int64   rank-row offsets
        ranks   [layers, 7 modules, slots] int32                   0 = module not adapted
        scaling [slots] float32

    KernelStep (per step, host lists -> one int32 buffer -> one copy):
        cu_q, ctx, block tables, attention work items      -> paged_attention
        seg_slot, seg_end, LoRA work items, xa scratch    -> lora_shrink / lora_expand

Adapters whose weights are not views of the arena (added as their own tensors, as the
tests' `runner` helper does) are left to the torch loop of `ModelRunner._linear`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastlibra.config import LORA_TARGETS
from fastlibra.model.kernels import upload
from fastlibra.model.kernels.attention import (
    kv_splits,
    launch_paged_attention,
    paged_attention,
    tile_tokens,
)
from fastlibra.model.kernels.attention import work_items as attention_work
from fastlibra.model.kernels.lora import (
    MAX_SPLIT,
    launch_expand,
    launch_shrink,
    lora_expand,
    lora_shrink,
    part_offsets,
    rank_block,
    split_k,
)
from fastlibra.model.kernels.lora import work_items as lora_work
from fastlibra.model.loader import ModelConfig
from fastlibra.model.lora import LoraAdapter


class LoraSlots:
    """Each arena-resident adapter's rank-row offsets, in a slot of device tables."""

    def __init__(self, cfg: ModelConfig, arena: torch.Tensor) -> None:
        self.cfg = cfg
        self.arena = arena
        self.flat = arena.view(-1)
        self.slot: dict[str, int] = {}
        self.keys: dict[str, set[tuple[int, int]]] = {}
        """name -> (layer, module index) pairs it adapts."""
        self.rank: dict[str, int] = {}
        self._free: list[int] = []
        self._alloc(slots=8, width=16)

    def _alloc(self, slots: int, width: int) -> None:
        dev, layers = self.arena.device, self.cfg.num_layers
        offsets = torch.zeros(layers, len(LORA_TARGETS), 2, slots, width, dtype=torch.int64,
                              device=dev)
        ranks = torch.zeros(layers, len(LORA_TARGETS), slots, dtype=torch.int32, device=dev)
        scaling = torch.zeros(slots, dtype=torch.float32, device=dev)
        if hasattr(self, "offsets"):  # grow: keep the slots in use
            p, w = self.offsets.shape[3:]
            offsets[..., :p, :w] = self.offsets
            ranks[..., :p] = self.ranks
            scaling[:p] = self.scaling
            self._free += list(range(p, slots))
        else:
            self._free = list(range(slots))
        self.offsets, self.ranks, self.scaling = offsets, ranks, scaling

    def add(self, adapter: LoraAdapter) -> bool:
        """Record the adapter if its parts are views of the arena; False if they are not."""
        ptr = self.arena.untyped_storage().data_ptr()
        if not adapter.parts or any(m.untyped_storage().data_ptr() != ptr
                                    for parts in adapter.parts.values()
                                    for part in parts for m in part):
            return False
        if not self._free or adapter.rank > self.offsets.shape[4]:
            self._alloc(max(self.offsets.shape[3], 2 * (len(self.slot) + 1)),
                        max(self.offsets.shape[4], adapter.rank))
        slot = self._free.pop(0)
        width = self.offsets.shape[4]
        offs = torch.zeros(self.cfg.num_layers, len(LORA_TARGETS), 2, width, dtype=torch.int64)
        ranks = torch.zeros(self.cfg.num_layers, len(LORA_TARGETS), dtype=torch.int32)
        keys = set()
        for (layer, module), parts in adapter.parts.items():
            a, b = part_offsets(parts, self.flat)
            m = LORA_TARGETS.index(module)
            offs[layer, m, 0, :len(a)] = torch.tensor(a)
            offs[layer, m, 1, :len(b)] = torch.tensor(b)
            ranks[layer, m] = len(a)
            keys.add((layer, m))
        dev = self.arena.device
        self.offsets[:, :, :, slot] = offs.to(dev)
        self.ranks[:, :, slot] = ranks.to(dev)
        self.scaling[slot] = adapter.scaling
        self.slot[adapter.name], self.keys[adapter.name] = slot, keys
        self.rank[adapter.name] = adapter.rank
        return True

    def remove(self, name: str) -> None:
        slot = self.slot.pop(name, None)
        if slot is not None:
            self.ranks[:, :, slot] = 0
            del self.keys[name], self.rank[name]
            self._free.append(slot)


class KernelStep:
    """What the kernels of one step read, built from host lists (rows in step order)."""

    def __init__(self, lengths: Sequence[int], ctx_lens: Sequence[int],
                 tables: Sequence[Sequence[int]], segments: Sequence[tuple[int, int, str]],
                 slots: LoraSlots, cfg: ModelConfig, block_size: int) -> None:
        dev = slots.arena.device
        b = len(lengths)
        need = -(-max(ctx_lens) // block_size)
        self.block_q = tile_tokens(cfg.num_heads, cfg.num_kv_heads, max(lengths))
        a_seq, a_q0 = attention_work(list(lengths), self.block_q)
        self.max_ctx = max(ctx_lens)
        self.splits = kv_splits(len(a_seq) * cfg.num_kv_heads, self.max_ctx, max(lengths))
        seg_bounds = [(s, e) for s, e, _ in segments]
        l_seg, l_row = lora_work(seg_bounds)
        cu_q = [0]
        for n in lengths:
            cu_q.append(cu_q[-1] + n)
        flat_tables = [blk for t in tables for blk in (list(t[:need]) + [0] * need)[:need]]
        parts = [cu_q, list(ctx_lens), a_seq, a_q0, flat_tables,
                 [slots.slot[name] for _, _, name in segments], [e for _, e in seg_bounds],
                 l_seg, l_row]
        buf = upload([v for p in parts for v in p], torch.int32, dev)
        views, at = [], 0
        for p in parts:
            views.append(buf[at:at + len(p)])
            at += len(p)
        (self.cu_q, self.ctx, self.work_seq, self.work_q0, tables_t, self.seg_slot,
         self.seg_end, self.lora_seg, self.lora_row) = views
        self.tables = tables_t.view(b, need)
        self.slots = slots
        self.keys = set().union(*(slots.keys[name] for _, _, name in segments)) \
            if segments else set()
        self.rank = max((slots.rank[name] for _, _, name in segments), default=0)
        self.xa = torch.empty(MAX_SPLIT, cu_q[-1], self.rank, dtype=torch.float32,
                              device=dev) if segments else None
        self.rank_tiles = -(-self.rank // rank_block(self.rank)) if segments else 0
        self._checked: set[str] = set()
        """Launchers whose arguments were checked in this step: the first call of each
        checks (metadata, dtypes, strides), later layers only launch."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None) -> torch.Tensor:
        """[T, heads, head_dim] of the step's rows; k, v: the layer's arena views."""
        if "attention" not in self._checked:
            self._checked.add("attention")
            return paged_attention(q, k, v, self.tables, self.cu_q, self.ctx, self.work_seq,
                                   self.work_q0, self.block_q, window=window,
                                   splits=self.splits, max_ctx=self.max_ctx)
        out = torch.empty_like(q)
        launch_paged_attention(q, k, v, self.tables, self.cu_q, self.ctx, self.work_seq,
                               self.work_q0, self.block_q, window, out, self.splits,
                               self.max_ctx)
        return out

    def lora(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += every arena adapter's update on its rows (two launches, or none when no
        adapter of the step adapts this module)."""
        m = LORA_TARGETS.index(module)
        if (layer, m) not in self.keys:
            return
        s = self.slots
        a_off = s.offsets[layer, m, 0, :, :self.rank]
        b_off = s.offsets[layer, m, 1, :, :self.rank]
        ranks = s.ranks[layer, m]
        shrink, expand = (launch_shrink, launch_expand) if module in self._checked \
            else (lora_shrink, lora_expand)
        self._checked.add(module)
        xa = self.xa[:split_k(self.lora_seg.numel() * self.rank_tiles, x.shape[1])]
        shrink(x, s.flat, a_off, ranks, s.scaling, self.seg_slot, self.seg_end,
               self.lora_seg, self.lora_row, xa)
        expand(xa, s.flat, b_off, ranks, self.seg_slot, self.seg_end,
               self.lora_seg, self.lora_row, y)
