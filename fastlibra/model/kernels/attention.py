"""Paged attention over the unified arena, one launch for a whole step.

    q      [T, num_heads, head_dim]           rows of every sequence, back to back
    cu_q   [B + 1] int32                      sequence i owns rows cu_q[i] .. cu_q[i+1]-1
    ctx    [B] int32                          cached prefix + new tokens of sequence i
    tables [B, >= ceil(max ctx / bs)] int32   arena block of each bs positions
    k, v   [num_blocks, bs, num_kv_heads, head_dim]   views of the arena, any strides

The new rows' K/V are already in their slots, so every key is read through the block
table, in place (no gather). A program owns one kv head and a tile of BLOCK_Q
consecutive query tokens of one sequence; its BLOCK_M rows are (token, head of the
group) pairs, so the query heads that share a kv head share each loaded K/V tile (GQA):

    row m = token (m // REP_P) x query head g * REP + (m % REP_P)

A decode is one tile of one token; a prefill chunk is ceil(n / BLOCK_Q) tiles; the host
lists the tiles of a step (`work`), so nothing is padded to the longest sequence and no
program searches for its sequence. Query token t of sequence i sits at position
ctx[i] - (cu_q[i+1] - cu_q[i]) + t and sees keys at positions <= its own (and, with a
sliding window w, > position - w).

A decode step of few sequences has few programs, each walking its whole context; with
`splits` > 1 each program walks one slice of the keys and writes its unnormalised sum
with its running max and denominator, and a second launch combines the slices
(`kv_splits` picks the count from the step's size and longest context).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlibra.model.kernels import INTERPRETED
from fastlibra.model.kernels.dot import dot


@triton.jit
def _paged_attention_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, cu_q_ptr, ctx_ptr, work_seq_ptr, work_q0_ptr,
        part_ptr, ml_ptr, scale, window, block_size, split_len,
        s_qt, s_qh, s_qd, s_ot, s_oh, s_od,
        s_kb, s_ks, s_kh, s_kd, s_vb, s_vs, s_vh, s_vd, s_tb, s_ps, s_pt, s_ms, s_mt,
        REP: tl.constexpr, REP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
        HEAD_DIM: tl.constexpr, HD_P: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    BLOCK_M: tl.constexpr = BLOCK_Q * REP_P
    w = tl.program_id(0)
    g = tl.program_id(1)
    part = tl.program_id(2)
    seq = tl.load(work_seq_ptr + w)
    q0 = tl.load(work_q0_ptr + w)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    ctx = tl.load(ctx_ptr + seq)
    prefix = ctx - q_len

    m = tl.arange(0, BLOCK_M)
    tok = q0 + m // REP_P
    head = g * REP + m % REP_P
    row_ok = (tok < q_len) & (m % REP_P < REP)
    d = tl.arange(0, HD_P)
    d_ok = d < HEAD_DIM
    row = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + row[:, None] * s_qt + head[:, None] * s_qh + d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = prefix + tok

    hi = tl.minimum(prefix + q0 + BLOCK_Q, ctx)  # keys past the tile's last query: none
    lo = tl.where(window > 0, tl.maximum(prefix + q0 - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
    if SPLIT > 1:  # this program's slice of the keys (slices are whole BLOCK_N tiles)
        lo = tl.maximum(lo, part * split_len)
        hi = tl.minimum(hi, part * split_len + split_len)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: empty rows give 0, not NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD_P], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        blk = tl.load(tables_ptr + seq * s_tb + n // block_size, mask=n_ok, other=0)
        blk = blk.to(tl.int64)
        slot = n % block_size
        kv_ok = n_ok[None, :] & d_ok[:, None]
        k = tl.load(k_ptr + blk[None, :] * s_kb + slot[None, :] * s_ks + g * s_kh
                    + d[:, None] * s_kd, mask=kv_ok, other=0.0)  # [HD_P, BLOCK_N]
        s = dot(q, k, IEEE, UPCAST)
        allowed = n_ok[None, :] & (n[None, :] <= q_pos[:, None]) \
            & ((window <= 0) | (n[None, :] > q_pos[:, None] - window))
        s = tl.where(allowed, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # V is masked too: a slot past the context may hold anything, NaN included.
        v = tl.load(v_ptr + blk[:, None] * s_vb + slot[:, None] * s_vs + g * s_vh
                    + d[None, :] * s_vd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE, UPCAST)
        m_i = m_new
    if SPLIT > 1:
        ml = ml_ptr + part * s_ms + row * s_mt + head * 2
        tl.store(ml, m_i, mask=row_ok)
        tl.store(ml + 1, l_i, mask=row_ok)
        tl.store(part_ptr + part * s_ps + row[:, None] * s_pt + head[:, None] * HD_P
                 + d[None, :], acc, mask=row_ok[:, None])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + row[:, None] * s_ot + head[:, None] * s_oh + d[None, :] * s_od,
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(out_ptr, part_ptr, ml_ptr, s_ot, s_oh, s_od, s_ps, s_pt, s_ms, s_mt,
                    SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, HD_P: tl.constexpr):
    """out[t, h] from the slices' (max, denominator, unnormalised sum)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, HD_P)
    m_all = tl.load(ml_ptr + t * s_mt + h * 2)
    for s in tl.static_range(1, SPLIT):
        m_all = tl.maximum(m_all, tl.load(ml_ptr + s * s_ms + t * s_mt + h * 2))
    num = tl.zeros([HD_P], tl.float32)
    den = tl.zeros([HD_P], tl.float32)
    for s in tl.static_range(SPLIT):
        ml = ml_ptr + s * s_ms + t * s_mt + h * 2
        weight = tl.exp(tl.load(ml) - m_all)
        num += weight * tl.load(part_ptr + s * s_ps + t * s_pt + h * HD_P + d)
        den += weight * tl.load(ml + 1)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + t * s_ot + h * s_oh + d * s_od, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tile_tokens(num_heads: int, num_kv_heads: int, max_q: int) -> int:
    """BLOCK_Q: query tokens per program. Rows = tokens x the group's heads (padded to a
    power of two) make at least 16 (the smallest tensor-core tile); a decode-only step
    takes one token per program, a step with chunks 64 rows."""
    rep = _pow2(num_heads // num_kv_heads)
    return max(1, (16 if max_q == 1 else 64) // rep)


MAX_SPLITS = 16


def kv_splits(programs: int, max_ctx: int, max_q: int) -> int:
    """Key slices per program: only for decode-only steps, enough programs to fill a GPU
    (about 128) when there are few, each slice at least 256 keys."""
    if max_q > 1:
        return 1
    return max(1, min(MAX_SPLITS, -(-128 // max(1, programs)), max_ctx // 256))


def work_items(q_lens: list[int], block_q: int) -> tuple[list[int], list[int]]:
    """(sequence, first query token) of every program of a step, from host lists."""
    seqs, starts = [], []
    for i, n in enumerate(q_lens):
        for q0 in range(0, n, block_q):
            seqs.append(i)
            starts.append(q0)
    return seqs, starts


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor,
                    cu_q: torch.Tensor, ctx: torch.Tensor, work_seq: torch.Tensor,
                    work_q0: torch.Tensor, block_q: int, *, window: int | None = None,
                    out: torch.Tensor | None = None, splits: int = 1,
                    max_ctx: int = 0) -> torch.Tensor:
    """Attention of every row of `q` over its sequence's paged context (see the module
    docstring); `work_seq`/`work_q0` from `work_items(..., block_q)`; `splits` slices of
    the keys, `max_ctx` the longest context (needed to slice). Returns `out`."""
    t, nh, hd = q.shape
    nb, bs, nkv, hd_k = k.shape
    if v.shape != k.shape or hd_k != hd:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"[blocks, block_size, kv_heads, {hd}]")
    if nh % nkv:
        raise ValueError(f"{nh} query heads are not a multiple of {nkv} kv heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    b = ctx.shape[0]
    for name, x, dims in (("cu_q", cu_q, 1), ("ctx", ctx, 1), ("tables", tables, 2),
                          ("work_seq", work_seq, 1), ("work_q0", work_q0, 1)):
        if x.dtype != torch.int32 or x.dim() != dims or x.device != q.device:
            raise ValueError(f"{name} must be a {dims}-d int32 tensor on {q.device}, "
                             f"got {x.dim()}-d {x.dtype} on {x.device}")
    if cu_q.shape[0] != b + 1 or tables.shape[0] != b or work_q0.shape != work_seq.shape:
        raise ValueError(f"cu_q has {cu_q.shape[0]} entries, tables {tables.shape[0]} rows "
                         f"for {b} sequences")
    for name, x in (("cu_q", cu_q), ("ctx", ctx), ("work_seq", work_seq),
                    ("work_q0", work_q0)):
        if x.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous")
    if tables.stride(1) != 1:
        raise ValueError("block table rows must be contiguous")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must match q")
    if not 1 <= splits <= MAX_SPLITS or (splits > 1 and max_ctx < 1):
        raise ValueError(f"splits={splits} must be in 1..{MAX_SPLITS}, with max_ctx > 0 "
                         f"when above 1 (got {max_ctx})")
    launch_paged_attention(q, k, v, tables, cu_q, ctx, work_seq, work_q0, block_q, window, out,
                           splits, max_ctx)
    return out


def launch_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           tables: torch.Tensor, cu_q: torch.Tensor, ctx: torch.Tensor,
                           work_seq: torch.Tensor, work_q0: torch.Tensor, block_q: int,
                           window: int | None, out: torch.Tensor, splits: int = 1,
                           max_ctx: int = 0) -> None:
    """The launch alone, for arguments `paged_attention` has checked: a step checks its
    metadata once, then launches for every layer (a check costs about a launch)."""
    if work_seq.numel() == 0:
        return
    t, nh, hd = q.shape
    nkv = k.shape[2]
    rep, hd_p, block_n = nh // nkv, max(16, _pow2(hd)), 32 if hd > 128 else 64
    part = ml = out  # not read unless split
    split_len = 0
    if splits > 1:
        split_len = triton.cdiv(triton.cdiv(max_ctx, splits), block_n) * block_n
        part = torch.empty(splits, t, nh, hd_p, dtype=torch.float32, device=q.device)
        ml = torch.empty(splits, t, nh, 2, dtype=torch.float32, device=q.device)
    _paged_attention_kernel[(work_seq.numel(), nkv, splits)](
        out, q, k, v, tables, cu_q, ctx, work_seq, work_q0, part, ml,
        hd ** -0.5, window or 0, k.shape[1], split_len,
        *q.stride(), *out.stride(), *k.stride(), *v.stride(), tables.stride(0),
        part.stride(0), part.stride(1), ml.stride(0), ml.stride(1),
        REP=rep, REP_P=_pow2(rep), BLOCK_Q=block_q, HEAD_DIM=hd, HD_P=hd_p,
        BLOCK_N=block_n, SPLIT=splits, IEEE=q.dtype == torch.float32,
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16)
    if splits > 1:
        _combine_kernel[(t, nh)](out, part, ml, *out.stride(), part.stride(0),
                                 part.stride(1), ml.stride(0), ml.stride(1),
                                 SPLIT=splits, HEAD_DIM=hd, HD_P=hd_p)


def paged_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              tables: torch.Tensor, cu_q: torch.Tensor, ctx: torch.Tensor,
                              window: int | None = None) -> torch.Tensor:
    """The same function in plain torch, one sequence at a time, in float32."""
    out = torch.empty_like(q)
    nh, nkv, bs = q.shape[1], k.shape[2], k.shape[1]
    for i in range(ctx.shape[0]):
        s, e, n = int(cu_q[i]), int(cu_q[i + 1]), int(ctx[i])
        pos = torch.arange(n, device=q.device)
        blk = tables[i].long()[pos // bs]
        keys = k[blk, pos % bs].float().repeat_interleave(nh // nkv, 1)  # [n, nh, hd]
        vals = v[blk, pos % bs].float().repeat_interleave(nh // nkv, 1)
        q_pos = pos[n - (e - s):]
        allowed = pos[None, :] <= q_pos[:, None]
        if window:
            allowed &= pos[None, :] > q_pos[:, None] - window
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), keys) * q.shape[2] ** -0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, vals).to(q.dtype)
    return out
