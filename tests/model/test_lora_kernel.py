"""The segmented LoRA kernels against their torch reference: adapters of different ranks
packed into scrambled arena blocks by `ArenaLayout` (ranks split across blocks), read in
place at rank-row offsets; base-model rows between segments; a module some adapters do
not adapt (rank 0 there); outputs poisoned first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tinymodels import DEVICE

pytest.importorskip("triton")
from fastlibra.model.kernels.lora import (  # noqa: E402
    lora_expand,
    lora_reference,
    lora_shrink,
    part_offsets,
    work_items,
)
from fastlibra.model.lora import ArenaLayout, LoraAdapter, LoraWeights  # noqa: E402

FAN_IN, FAN_OUT = 300, 40
BLOCK_ELEMS = 1400  # 4 rank rows (300 + 40 elements each) per block: ranks get split


def packed_adapters(ranks: list[int], dtype: torch.dtype, g: torch.Generator):
    """Adapters with a (0, "q_proj") update of each rank (0 = module not adapted), packed
    into scrambled blocks of one flat arena. Returns (arena, [(parts or None, scaling)])."""
    adapters = []
    for i, r in enumerate(ranks):
        w = {} if r == 0 else {(0, "q_proj"): LoraWeights(
            torch.randn(r, FAN_IN, generator=g).to(dtype),
            torch.randn(FAN_OUT, r, generator=g).to(dtype))}
        if r == 0:  # adapts another module only
            w[(0, "v_proj")] = LoraWeights(torch.randn(4, FAN_IN, generator=g).to(dtype),
                                           torch.randn(FAN_OUT, 4, generator=g).to(dtype))
        adapters.append(LoraAdapter(f"a{i}", max(r, 4), 0.5 + i / 4, ("q_proj",), w, Path(".")))
    layouts = [ArenaLayout(a, BLOCK_ELEMS) for a in adapters]
    nblocks = sum(lay.num_blocks for lay in layouts) + 2
    arena = torch.full((nblocks, BLOCK_ELEMS), float("nan"), dtype=dtype)
    free = torch.randperm(nblocks, generator=g).tolist()
    out = []
    for ad, lay in zip(adapters, layouts, strict=True):
        blocks = [arena[b] for b in free[:lay.num_blocks]]
        free = free[lay.num_blocks:]
        lay.write(ad, blocks)
        out.append((lay.views(blocks).get((0, "q_proj")), ad.scaling))
    return arena.to(DEVICE), out


def run_both(ranks: list[int], segments: list[tuple[int, int, int]], rows: int,
             dtype: torch.dtype, seed: int, splits: int = 1):
    g = torch.Generator().manual_seed(seed)
    arena, adapters = packed_adapters(ranks, dtype, g)
    flat = arena.view(-1)
    r_max = max(ranks)
    a_off = torch.zeros(len(ranks), r_max, dtype=torch.int64)
    b_off = torch.zeros(len(ranks), r_max, dtype=torch.int64)
    for s, (parts, _) in enumerate(adapters):
        if parts:
            a, b = part_offsets(parts, flat)
            a_off[s, :len(a)], b_off[s, :len(b)] = torch.tensor(a), torch.tensor(b)
    dev = dict(device=flat.device)
    i32 = dict(dtype=torch.int32, **dev)
    ranks_t = torch.tensor(ranks, **i32)
    scaling = torch.tensor([sc for _, sc in adapters], dtype=torch.float32, **dev)
    a_off, b_off = a_off.to(flat.device), b_off.to(flat.device)
    x = torch.randn(rows, FAN_IN, generator=g).to(dtype).to(flat.device)
    y0 = torch.randn(rows, FAN_OUT, generator=g).to(dtype).to(flat.device)
    want = y0.clone()
    lora_reference(x, flat, a_off, b_off, ranks_t, scaling, segments, want)
    by_parts = y0.clone().float()  # the same from the views, not the offsets
    for s, e, p in segments:
        parts, sc = adapters[p]
        for a, bt in parts or []:
            by_parts[s:e] += sc * x[s:e].float() @ a.float().T @ bt.float()
    torch.testing.assert_close(want.float(), by_parts, atol=1e-3, rtol=1e-2)
    seg, row = work_items([(s, e) for s, e, _ in segments])
    seg_t, row_t = torch.tensor(seg, **i32), torch.tensor(row, **i32)
    seg_slot = torch.tensor([p for _, _, p in segments], **i32)
    seg_end = torch.tensor([e for _, e, _ in segments], **i32)
    xa = torch.full((splits, rows, r_max), float("nan"), **dev)
    got = y0.clone()
    lora_shrink(x, flat, a_off, ranks_t, scaling, seg_slot, seg_end, seg_t, row_t, xa)
    lora_expand(xa, flat, b_off, ranks_t, seg_slot, seg_end, seg_t, row_t, got)
    return got, want, y0, segments


@pytest.mark.parametrize("splits", [1, 3])
def test_eight_adapters_of_mixed_ranks_and_base_rows(splits):
    ranks = [8, 16, 4, 0, 32, 8, 12, 20]  # per slot; the 0: an adapter of v_proj only
    # (rows, slot): rows 0-2 base model; one segment per adapter in another order than
    # the slots, some longer than a tile; rows 33-35 and 60-61 base model too
    segments = [(3, 4, 5), (4, 23, 1), (23, 24, 7), (24, 30, 3), (30, 31, 4), (31, 33, 0),
                (36, 37, 2), (37, 60, 6)]
    got, want, y0, _ = run_both(ranks, segments, 62, torch.float32, seed=0, splits=splits)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # base rows, the gap (33-35), the tail and the rank-0 segment are untouched
    for s, e in [(0, 3), (24, 30), (33, 36), (60, 62)]:
        assert torch.equal(got[s:e], y0[s:e])
    assert (got[4:23] - y0[4:23]).abs().min() > 0  # every adapted row changed


def test_bfloat16():
    got, want, _, _ = run_both([16, 4, 8], [(0, 1, 2), (1, 18, 0), (20, 21, 1)], 21,
                               torch.bfloat16, seed=1, splits=2)
    # xa is rounded to bfloat16 before the expand (as the torch path's bf16 products)
    scale = float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), atol=0.01 * scale, rtol=0)


def test_offsets_must_come_from_the_arena():
    with pytest.raises(ValueError, match="row-major views of the arena"):
        part_offsets([(torch.zeros(2, 3), torch.zeros(2, 4))], torch.zeros(10))
    x = torch.zeros(2, FAN_IN)
    i32 = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="ranks must be torch.int32"):
        lora_shrink(x, torch.zeros(9), torch.zeros(1, 2, dtype=torch.int64), i32.long(),
                    torch.ones(1), i32, i32, i32, i32, torch.zeros(1, 2, 2))


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 20),
                          st.sampled_from([0, 4, 8, 12, 24])), min_size=1, max_size=6),
       st.integers(0, 2**16), st.integers(1, 3))
def test_drawn_batches_match_reference(layout, seed, splits):
    """(base rows before it, rows, rank) per segment; slots in reverse order."""
    ranks = [r for _, _, r in layout][::-1]
    if not any(ranks):
        ranks[0] = 4
    segments, row = [], 0
    for i, (gap, n, _) in enumerate(layout):
        segments.append((row + gap, row + gap + n, len(layout) - 1 - i))
        row += gap + n
    got, want, _, _ = run_both(ranks, segments, row + 1, torch.float32, seed, splits)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
