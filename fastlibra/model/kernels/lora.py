"""Segmented multi-LoRA in Triton: y[rows of segment s] += scaling[s] * x A_s^T B_s^T for
every adapter segment of a step, in one shrink and one expand launch per (layer, module).

The adapters stay where the cache put them: their rank rows are read at element offsets
into one flat tensor (the unified arena, `ArenaLayout` packs them rank row by rank row):

    weights  [N] flat                 the arena as one vector
    a_off    [P, R] int64             A row j of adapter slot p: weights[a_off[p, j] + 0 .. fan_in)
    b_off    [P, R] int64             B^T row j:                 weights[b_off[p, j] + 0 .. fan_out)
    ranks    [P] int32                rows of p's update for this module (0: not adapted)
    scaling  [P] float32              (slot tables: written when an adapter lands, not per step)
    seg_slot [S] int32                segment s of the step uses slot seg_slot[s]
    seg_end  [S] int32                its rows end here (exclusive)
    work     (segment, first row) of each tile of BLOCK_T rows, from the host

    shrink:  xa[k, rows, :rank] = scaling * x[rows, K_k] @ A[:, K_k]^T
                                        xa [SPLIT, T, >= R] float32, K_k: the k-th of SPLIT
                                        slices of the input features
    expand:  y[rows] += sum_k xa[k, rows, :rank] @ B^T      in place, y's dtype

R is the widest rank of the step: pass `a_off[:, :R]` (strides are arguments). A decode
step has few rows, so few shrink programs, each walking the whole input width; the split
(`split_k`) spreads that walk over more programs, and the expand adds the partial sums
(no atomics: the result does not depend on the order programs finish in).

Rows of the base model are in no segment and cost nothing; adapters of different ranks
share a launch (a program past its segment's rank returns at once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlibra.model.kernels import INTERPRETED
from fastlibra.model.kernels.dot import dot

BLOCK_T = 16
"""Rows per program: the smallest tensor-core tile (a decode segment of one row pads to it)."""
BLOCK_K = 128
"""Input features per shrink iteration."""


@triton.jit
def _shrink_kernel(x_ptr, w_ptr, xa_ptr, a_off_ptr, ranks_ptr, scaling_ptr, seg_slot_ptr,
                   seg_end_ptr, work_seg_ptr, work_row_ptr, fan_in, k_per_split,
                   s_xt, s_xk, s_as, s_at, s_ar, s_os, s_or,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    r_tile = tl.program_id(1)
    split = tl.program_id(2)
    seg = tl.load(work_seg_ptr + pid)
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    if r_tile * BLOCK_R >= rank:
        return
    row0 = tl.load(work_row_ptr + pid)
    rows = row0 + tl.arange(0, BLOCK_T)
    row_ok = rows < tl.load(seg_end_ptr + seg)
    rows = rows.to(tl.int64)
    r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rank
    a_off = tl.load(a_off_ptr + slot * s_os + r * s_or, mask=r_ok, other=0)
    acc = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    k_end = tl.minimum(split * k_per_split + k_per_split, fan_in)
    for k0 in range(split * k_per_split, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_end
        x = tl.load(x_ptr + rows[:, None] * s_xt + k[None, :] * s_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(w_ptr + a_off[None, :] + k[:, None],
                    mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
        acc += dot(x.to(a.dtype), a, IEEE, UPCAST)
    acc *= tl.load(scaling_ptr + slot)
    tl.store(xa_ptr + split * s_as + rows[:, None] * s_at + r[None, :] * s_ar, acc,
             mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(xa_ptr, w_ptr, y_ptr, b_off_ptr, ranks_ptr, seg_slot_ptr, seg_end_ptr,
                   work_seg_ptr, work_row_ptr, fan_out,
                   s_as, s_at, s_ar, s_yt, s_yn, s_os, s_or,
                   SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    n_tile = tl.program_id(1)
    seg = tl.load(work_seg_ptr + pid)
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:
        return
    row0 = tl.load(work_row_ptr + pid)
    rows = row0 + tl.arange(0, BLOCK_T)
    row_ok = rows < tl.load(seg_end_ptr + seg)
    rows = rows.to(tl.int64)
    n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < fan_out
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        xa_ptrs = xa_ptr + rows[:, None] * s_at + r[None, :] * s_ar
        xa_ok = row_ok[:, None] & r_ok[None, :]
        xa = tl.load(xa_ptrs, mask=xa_ok, other=0.0)
        for k in range(1, SPLIT):
            xa += tl.load(xa_ptrs + k * s_as, mask=xa_ok, other=0.0)
        b_off = tl.load(b_off_ptr + slot * s_os + r * s_or, mask=r_ok, other=0)
        b = tl.load(w_ptr + b_off[:, None] + n[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        acc += dot(xa.to(b.dtype), b, IEEE, UPCAST)
    y_ptrs = y_ptr + rows[:, None] * s_yt + n[None, :] * s_yn
    mask = row_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


MAX_SPLIT = 8


def split_k(programs: int, fan_in: int) -> int:
    """Input-width slices of a shrink: enough programs to fill a GPU (about 128) when a
    step has few rows, each slice at least 512 features wide, at most `MAX_SPLIT`."""
    return max(1, min(MAX_SPLIT, fan_in // 512, -(-128 // max(1, programs))))


def rank_block(max_rank: int) -> int:
    """BLOCK_R from the step's largest rank: 16 .. 64."""
    return min(64, max(16, _pow2(max_rank)))


def work_items(segments: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(segment, first row) of every BLOCK_T-row tile of the segments' [start, end) rows."""
    seg, row = [], []
    for i, (s, e) in enumerate(segments):
        for r in range(s, e, BLOCK_T):
            seg.append(i)
            row.append(r)
    return seg, row


def _check(weights: torch.Tensor, offs: torch.Tensor, ranks: torch.Tensor,
           seg_slot: torch.Tensor, seg_end: torch.Tensor, work_seg: torch.Tensor,
           work_row: torch.Tensor, device: torch.device) -> None:
    if weights.dim() != 1 or weights.stride(0) != 1 or weights.storage_offset() != 0:
        raise ValueError("weights must be one contiguous flat tensor (the arena's view(-1))")
    p, s = ranks.shape[0], seg_slot.shape[0]
    for name, x, dtype, shape in (("offsets", offs, torch.int64, (p, offs.shape[1])),
                                  ("ranks", ranks, torch.int32, (p,)),
                                  ("seg_slot", seg_slot, torch.int32, (s,)),
                                  ("seg_end", seg_end, torch.int32, (s,)),
                                  ("work_seg", work_seg, torch.int32, (work_seg.shape[0],)),
                                  ("work_row", work_row, torch.int32, work_seg.shape)):
        if x.dtype != dtype or tuple(x.shape) != tuple(shape) or x.device != device:
            raise ValueError(f"{name} must be {dtype} of shape {tuple(shape)} on {device}, "
                             f"got {x.dtype} {tuple(x.shape)} on {x.device}")
    for name, x in (("ranks", ranks), ("seg_slot", seg_slot), ("seg_end", seg_end),
                    ("work_seg", work_seg), ("work_row", work_row)):
        if x.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous")
    if offs.stride(1) != 1:
        raise ValueError("offset rows must be contiguous")


def lora_shrink(x: torch.Tensor, weights: torch.Tensor, a_off: torch.Tensor,
                ranks: torch.Tensor, scaling: torch.Tensor, seg_slot: torch.Tensor,
                seg_end: torch.Tensor, work_seg: torch.Tensor, work_row: torch.Tensor,
                xa: torch.Tensor) -> None:
    """xa[rows of s, :rank] = scaling * x[rows] @ A^T of s's slot (see the module docstring)."""
    _check(weights, a_off, ranks, seg_slot, seg_end, work_seg, work_row, x.device)
    if x.dtype != weights.dtype or xa.dtype != torch.float32:
        raise ValueError(f"x ({x.dtype}) must have the weights' dtype ({weights.dtype}), "
                         f"xa ({xa.dtype}) must be float32")
    if xa.dim() != 3 or xa.shape[1] != x.shape[0] or xa.shape[2] < a_off.shape[1]:
        raise ValueError(f"xa {tuple(xa.shape)} must be [splits, {x.shape[0]} rows, >= "
                         f"{a_off.shape[1]}]")
    if scaling.dtype != torch.float32 or scaling.shape != ranks.shape:
        raise ValueError("scaling must be float32, one per segment")
    launch_shrink(x, weights, a_off, ranks, scaling, seg_slot, seg_end, work_seg, work_row, xa)


def launch_shrink(x: torch.Tensor, weights: torch.Tensor, a_off: torch.Tensor,
                  ranks: torch.Tensor, scaling: torch.Tensor, seg_slot: torch.Tensor,
                  seg_end: torch.Tensor, work_seg: torch.Tensor, work_row: torch.Tensor,
                  xa: torch.Tensor) -> None:
    """`lora_shrink` without its checks, for a step that checked its metadata once."""
    if work_seg.numel() == 0 or a_off.shape[1] == 0:
        return
    block_r = rank_block(a_off.shape[1])
    splits, fan_in = xa.shape[0], x.shape[1]
    k_per_split = triton.cdiv(triton.cdiv(fan_in, splits), BLOCK_K) * BLOCK_K
    grid = (work_seg.numel(), triton.cdiv(a_off.shape[1], block_r), splits)
    _shrink_kernel[grid](x, weights, xa, a_off, ranks, scaling, seg_slot, seg_end, work_seg,
                         work_row, fan_in, k_per_split, *x.stride(), *xa.stride(),
                         *a_off.stride(), BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_K=BLOCK_K,
                         IEEE=x.dtype == torch.float32,
                         UPCAST=INTERPRETED and x.dtype == torch.bfloat16)


def lora_expand(xa: torch.Tensor, weights: torch.Tensor, b_off: torch.Tensor,
                ranks: torch.Tensor, seg_slot: torch.Tensor, seg_end: torch.Tensor,
                work_seg: torch.Tensor, work_row: torch.Tensor, y: torch.Tensor) -> None:
    """y[rows of s] += (sum over splits of xa)[rows, :rank] @ B^T of s's slot, in place."""
    _check(weights, b_off, ranks, seg_slot, seg_end, work_seg, work_row, y.device)
    if y.dtype != weights.dtype or xa.dtype != torch.float32 or xa.dim() != 3 \
            or xa.shape[1] != y.shape[0] or not 1 <= xa.shape[0] <= MAX_SPLIT:
        raise ValueError(f"y ({y.dtype}) must have the weights' dtype ({weights.dtype}) and "
                         f"xa (float32, [1..{MAX_SPLIT} splits, rows, rank]) its {y.shape[0]} "
                         "rows")
    launch_expand(xa, weights, b_off, ranks, seg_slot, seg_end, work_seg, work_row, y)


def launch_expand(xa: torch.Tensor, weights: torch.Tensor, b_off: torch.Tensor,
                  ranks: torch.Tensor, seg_slot: torch.Tensor, seg_end: torch.Tensor,
                  work_seg: torch.Tensor, work_row: torch.Tensor, y: torch.Tensor) -> None:
    """`lora_expand` without its checks, for a step that checked its metadata once."""
    if work_seg.numel() == 0 or b_off.shape[1] == 0:
        return
    grid = (work_seg.numel(), triton.cdiv(y.shape[1], 64))
    _expand_kernel[grid](xa, weights, y, b_off, ranks, seg_slot, seg_end, work_seg, work_row,
                         y.shape[1], *xa.stride(), *y.stride(), *b_off.stride(),
                         SPLIT=xa.shape[0], BLOCK_T=BLOCK_T, BLOCK_R=rank_block(b_off.shape[1]), BLOCK_N=64,
                         IEEE=y.dtype == torch.float32,
                         UPCAST=INTERPRETED and y.dtype == torch.bfloat16)


def lora_reference(x: torch.Tensor, weights: torch.Tensor, a_off: torch.Tensor,
                   b_off: torch.Tensor, ranks: torch.Tensor, scaling: torch.Tensor,
                   segments: list[tuple[int, int, int]], y: torch.Tensor) -> None:
    """Shrink then expand in plain torch (float32), one (start, end, slot) segment at a
    time, into y."""
    fan_in, fan_out = x.shape[1], y.shape[1]
    for start, end, s in segments:
        r = int(ranks[s])
        if r == 0:
            continue
        a = weights[a_off[s, :r, None] + torch.arange(fan_in, device=x.device)]  # [r, in]
        bt = weights[b_off[s, :r, None] + torch.arange(fan_out, device=x.device)]  # [r, out]
        upd = float(scaling[s]) * x[start:end].float() @ a.float().T @ bt.float()
        y[start:end] = (y[start:end].float() + upd).to(y.dtype)


def part_offsets(parts: list[tuple[torch.Tensor, torch.Tensor]],
                 base: torch.Tensor) -> tuple[list[int], list[int]]:
    """Element offsets into `base`'s storage of each rank row of A and of B^T, from an
    adapter's parts (views (A rows [k, in], B^T rows [k, out]) of `base`)."""
    a_off: list[int] = []
    b_off: list[int] = []
    ptr = base.untyped_storage().data_ptr()
    for a, bt in parts:
        for m in (a, bt):
            if m.untyped_storage().data_ptr() != ptr or m.stride(1) != 1:
                raise ValueError("adapter parts must be row-major views of the arena")
        a_off += [a.storage_offset() + j * a.stride(0) for j in range(a.shape[0])]
        b_off += [bt.storage_offset() + j * bt.stride(0) for j in range(bt.shape[0])]
    return a_off, b_off
