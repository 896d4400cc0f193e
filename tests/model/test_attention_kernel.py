"""The paged attention kernel against its plain-torch reference (under TRITON_INTERPRET=1
on CPU, compiled on CUDA): fresh random inputs each case, outputs poisoned with NaN
first, K/V read in place from a 6-d arena view, unused arena slots poisoned too."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tinymodels import DEVICE

pytest.importorskip("triton")
from fastlibra.model.kernels.attention import (  # noqa: E402
    kv_splits,
    paged_attention,
    paged_attention_reference,
    tile_tokens,
    work_items,
)


def case(seqs: list[tuple[int, int]], nh: int, nkv: int, hd: int, bs: int,
         dtype: torch.dtype, seed: int):
    """seqs: (cached prefix, new tokens) per sequence. Returns the kernel's arguments,
    with K/V as strided views of an arena shaped like KVCache.data (layer 1 of 2)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(p + n) // bs) for p, n in seqs]
    nblocks = sum(need) + 3
    arena = torch.full((nblocks, 2, 2, bs, nkv, hd), float("nan"), dtype=dtype)
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables = torch.zeros(len(seqs), max(need), dtype=torch.int32)
    for i, (p, n) in enumerate(seqs):
        blocks, perm = perm[:need[i]], perm[need[i]:]
        tables[i, :need[i]] = torch.tensor(blocks)
        for pos in range(p + n):  # only the context's slots get real K/V
            arena[blocks[pos // bs], 1, :, pos % bs] = torch.randn(2, nkv, hd, generator=g)
    lens = [n for _, n in seqs]
    cu_q = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    ctx = torch.tensor([p + n for p, n in seqs], dtype=torch.int32)
    q = torch.randn(sum(lens), nh, hd, generator=g).to(dtype)
    dev = torch.device(DEVICE)
    return (q.to(dev), arena[:, 1, 0].to(dev), arena[:, 1, 1].to(dev), tables.to(dev),
            cu_q.to(dev), ctx.to(dev))


def run(args, window=None, splits=1):
    q, k, v, tables, cu_q, ctx = args
    lens = (cu_q[1:] - cu_q[:-1]).tolist()
    block_q = tile_tokens(q.shape[1], k.shape[2], max(lens))
    seq, q0 = work_items(lens, block_q)
    i32 = dict(dtype=torch.int32, device=q.device)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k, v, tables, cu_q, ctx, torch.tensor(seq, **i32),
                    torch.tensor(q0, **i32), block_q, window=window, out=out, splits=splits,
                    max_ctx=int(ctx.max()))
    return out


MIXED = [(5, 1), (0, 7), (6, 9), (13, 1), (0, 1), (3, 20)]
"""Decodes, a plain prefill, chunks after prefixes that end inside a block."""


@pytest.mark.parametrize("nh,nkv", [(4, 2), (6, 2), (2, 2)])
def test_mixed_step_matches_reference(nh, nkv):
    args = case(MIXED, nh, nkv, hd=16, bs=4, dtype=torch.float32, seed=nh * 10 + nkv)
    want = paged_attention_reference(*args)
    got = run(args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 100])
def test_keys_split_into_slices_match_reference(window):
    """Decodes over 150-300 keys in 3 slices of 128 (one slice empty for the shortest, a
    window that skips the first slices), and the step's own choice of slices."""
    args = case([(150, 1), (299, 1), (40, 1), (200, 1)], 4, 2, hd=16, bs=4,
                dtype=torch.float32, seed=7)
    want = paged_attention_reference(*args, window=window)
    torch.testing.assert_close(run(args, window, splits=3), want, atol=1e-5, rtol=1e-5)
    assert kv_splits(programs=8, max_ctx=300, max_q=1) == 1  # slices of >= 256 keys
    assert kv_splits(programs=8, max_ctx=4096, max_q=1) == 16
    assert kv_splits(programs=256, max_ctx=4096, max_q=1) == 1  # enough programs
    assert kv_splits(programs=8, max_ctx=4096, max_q=7) == 1  # chunks: never


def test_bfloat16_and_sliding_window():
    args = case(MIXED, 8, 2, hd=32, bs=8, dtype=torch.bfloat16, seed=3)
    for window in (None, 4):
        want = paged_attention_reference(*args, window=window)
        torch.testing.assert_close(run(args, window).float(), want.float(), atol=2e-2,
                                   rtol=2e-2)
    # The window changed the answer (so the comparison above tests it).
    assert (run(args, 4).float() - run(args).float()).abs().max() > 0.1


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(1, 10)), min_size=1, max_size=5),
       st.integers(0, 2**16))
def test_drawn_batches_match_reference(seqs, seed):
    args = case(seqs, 4, 2, hd=16, bs=4, dtype=torch.float32, seed=seed)
    torch.testing.assert_close(run(args), paged_attention_reference(*args), atol=1e-5,
                               rtol=1e-5)


def test_bad_arguments_are_named():
    q, k, v, tables, cu_q, ctx = case([(0, 3)], 4, 2, hd=16, bs=4, dtype=torch.float32,
                                      seed=0)
    z = torch.zeros(1, dtype=torch.int32, device=q.device)
    with pytest.raises(ValueError, match="ctx must be a 1-d int32"):
        paged_attention(q, k, v, tables, cu_q, ctx.long(), z, z, 1)
    with pytest.raises(ValueError, match="q, k, v dtypes differ"):
        paged_attention(q.half(), k, v, tables, cu_q, ctx, z, z, 1)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
        paged_attention(q[:, :3], k, v, tables, cu_q, ctx, z, z, 1)
    with pytest.raises(ValueError, match="with max_ctx > 0"):
        paged_attention(q, k, v, tables, cu_q, ctx, z, z, 1, splits=2)
