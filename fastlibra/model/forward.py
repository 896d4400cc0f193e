"""The forward pass: a batch of sequences, paged KV, several LoRA adapters at once.

Paged KV arena (one tensor, block-major, so one block id is one contiguous chunk of
bytes for all layers — the unit the cache manager allocates and the swapper copies):

    data: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
           │           │           └ 0 = K, 1 = V
           │           └ layer l
           └ block id, as in `Allocation.block_table()`

    k(l) = data[:, l, 0]  ->  [num_blocks, block_size, num_kv_heads, head_dim]  (a view)
    v(l) = data[:, l, 1]  ->  the same for V

A sequence with block table T = [7, 2, 9] and block_size 4 keeps position p at
k(l)[T[p // 4], p % 4]:

    positions  0 1 2 3 | 4 5 6 7 | 8 9 . .
    block      7       | 2       | 9         (block 9 has 2 free slots left)

One step (`ModelRunner.forward`):

    seqs (any order) ──sort by adapter──► token rows grouped:  [base | A A A | B B]
    per layer:
      q/k/v/o, gate/up/down = x @ W.T  (+ bias)   for every row at once
                            + scale_a * (x[seg] @ A_a.T) @ B_a.T   per adapter segment
      K/V of the new rows ─write─► their slots;  attention reads each sequence's
      whole context (cached prefix + new rows) back through its block table, whole
      blocks at a time, the slots past its end in its last block zeroed (or, with no
      cached prefix, uses the new K/V directly), with a causal mask offset by the prefix (and a sliding window where the model has one);
      no mask at all when the batch needs none (equal-length decode or plain causal
      prefill); grouped KV heads are broadcast by SDPA, never copied
    logits of each sequence's last row (or every row), in the caller's order

The kernel path (CUDA by default, `FASTLIBRA_KERNELS=triton` anywhere; see
`kernels/step.py`) keeps the projections and the K/V write, and replaces the attention
by one paged-attention launch that reads the arena in place, and the per-segment LoRA
loop by one shrink and one expand launch over adapters resident in the arena.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fastlibra.model.kernels import kernels_wanted, upload
from fastlibra.model.loader import ModelConfig, ModelWeights
from fastlibra.model.lora import LoraAdapter

if TYPE_CHECKING:
    from fastlibra.model.kernels.step import KernelStep, LoraSlots


class KVCache:
    """The device KV arena; see the module docstring for the layout."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("KVCache needs num_blocks > 0 and block_size > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.data = torch.zeros(num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads,
                                cfg.head_dim, dtype=dtype, device=device)

    def k(self, layer: int) -> torch.Tensor:
        return self.data[:, layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.data[:, layer, 1]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers (= CacheConfig.block_bytes at this dtype)."""
        return self.data[0].nbytes

    @property
    def block_elems(self) -> int:
        """Elements of one block: the unit adapters are packed into (`ArenaLayout`)."""
        return self.data[0].numel()


@dataclass(frozen=True)
class SeqInput:
    """One sequence's work in a step: compute `tokens` at positions
    prefix_len .. prefix_len + len(tokens) - 1; the KV of positions < prefix_len is
    already in the first blocks of `block_table`."""

    tokens: Sequence[int]
    prefix_len: int
    block_table: Sequence[int]
    adapter: str | None = None
    """A name registered with `ModelRunner.add_adapter`; None = the base model."""


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _lm_head_column_major(w: ModelWeights) -> None:
    """Store the [vocab, hidden] output projection column-major (the same values, no
    extra copy kept): on CPU, `x @ lm_head.T` with M = 1..64 rows then reads the weight
    in the order the GEMM wants it, about 2x faster at M = 1 (4.5 ms instead of 8.5 ms
    for 32000 x 768 fp32, one thread), never slower. Tied embeddings follow (their row
    gather gets slower, ~6 ms per 1,024 tokens at that size: small against a prefill)."""
    col = w.lm_head.t().contiguous().t()  # no copy when it already is column-major
    if w.embed_tokens is w.lm_head:
        w.embed_tokens = col
    w.lm_head = col


CPU_ATTENTION_FP32 = True
"""On CPU, compute attention in float32 when the model runs in bfloat16/float16 (the
cache stays in the model's dtype; only the step's gathered context is widened). torch's
CPU flash-attention kernel is ~5x slower in bf16 for one-query decode: 3.4 ms against
0.6 ms per layer at batch 16, context 144, 12/4 heads of 64 (one thread, this machine);
a prefill takes the same time either way. It is also the more accurate sum."""

CPU_LORA_FP32 = True
"""On CPU, the LoRA products of a bfloat16/float16 model run in float32 (the adapter's
weights stay in their arena blocks in the model's dtype and are widened per step, 2 x
rank x width elements). oneDNN's bf16 matmul builds a kernel for every new row count:
about 0.3 ms per product where a step's row count is new, and a chat's prefill lengths
almost always are. A step pays that twice per adapter, layer and module. Through the
engine, 40-token follow-ups of varying lengths took 54.6 ms in bf16 against 22.7 ms at a
fixed length. MKL's fp32 products build nothing."""

PACK_CPU_LINEARS = True
"""On CPU, keep a oneDNN-prepacked copy of every decoder projection and of the output
projection (costs their memory once more). `fastlibra bench model` (hidden 768, fp32, one
thread): a 16-row decode step 60 -> 37 ms, a 1-row step unchanged, a 1,024-token
prefill ~1.15x faster; the 32000 x 768 output projection alone 2x faster at 16 rows."""


def _can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN prepacking works here and agrees with F.linear (probed once)."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        w = torch.linspace(-1, 1, 128, dtype=dtype).view(8, 16)  # no global RNG use
        x = torch.linspace(-2, 1, 48, dtype=dtype).view(3, 16)
        got = _packed_linear(x, torch.ops.mkldnn._reorder_linear_weight(w, 16), None)
    except (RuntimeError, AttributeError):
        return False
    return torch.allclose(got.float(), F.linear(x, w).float(), atol=0.05, rtol=0.02)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack_linears(w: ModelWeights) -> dict[tuple[int, str] | str, torch.Tensor]:
    """(layer, module) or "lm_head" -> the weight prepacked for oneDNN (batch hint 16)."""
    out: dict[tuple[int, str] | str, torch.Tensor] = {
        (i, m): torch.ops.mkldnn._reorder_linear_weight(getattr(lw, m), 16)
        for i, lw in enumerate(w.layers) for m in _PROJECTIONS}
    out["lm_head"] = torch.ops.mkldnn._reorder_linear_weight(w.lm_head, 16)
    return out


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class _Step:
    """Index tensors of one step, shared by every layer (rows in adapter-sorted order).

    Rows are grouped by sequence; the padded batch has one [Q, ...] slab per sequence
    (Q = the most new tokens of any sequence). When every sequence computes the same
    number of new tokens (`uniform`: decode, or equal prefills) the padded batch is a
    plain view of the rows, so no scatter/gather is needed."""

    order: list[int]  # step row-group i is caller's sequence order[i]
    segments: list[tuple[int, int, LoraAdapter]]  # token rows [s, e) use this adapter
    lengths: list[int]  # new tokens per sequence (sorted order)
    ids: torch.Tensor  # [T] token ids
    cos: torch.Tensor  # [T, 1, head_dim]
    sin: torch.Tensor  # [T, 1, head_dim]
    write_block: torch.Tensor  # [T] block id of each new row's K/V
    write_off: torch.Tensor  # [T] offset inside that block
    uniform: bool  # every sequence has Q new rows
    q_seq: torch.Tensor  # [T] padded-batch index of each row
    q_idx: torch.Tensor  # [T] index of the row inside its sequence's new tokens
    tables: torch.Tensor | None  # [B, ceil(L / block_size)]; None: no cached prefix,
    # the context is exactly this step's new K/V
    ctx_len: int  # L: the longest context (cached prefix + new tokens)
    stale: torch.Tensor | None
    """[S] rows of the gathered context ([B * nblk * block_size] slots) past a sequence's
    end inside its last block: zeroed before attention, because a masked weight is 0 and
    0 x NaN is NaN, and a freed block may hold anything (at most block_size - 1 slots
    per sequence; a short table is padded with the sequence's own first block, which it
    reads anyway). None when every context is L long."""
    attn: dict[int | None, tuple[torch.Tensor | None, bool]]
    """window -> (mask [B, 1, Q, L] bool True = attend, or None; is_causal)."""
    last_rows: torch.Tensor  # [B] flat row of each sequence's last new token
    kernel: KernelStep | None = None
    """The kernel path's metadata (then `attn` and `tables` are unused, and `segments`
    holds only adapters outside the arena)."""

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] rows -> [B, Q, ...] padded batch (padding rows are zero)."""
        b, q = len(self.lengths), max(self.lengths)
        if self.uniform:
            return x.view(b, q, *x.shape[1:])
        out = x.new_zeros(b, q, *x.shape[1:])
        out[self.q_seq, self.q_idx] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Q, ...] padded batch -> [T, ...] rows."""
        if self.uniform:
            return x.reshape(-1, *x.shape[2:])
        return x[self.q_seq, self.q_idx]


def _check_disjoint_writes(seqs: list[SeqInput], bs: int) -> None:
    """No two sequences write the same KV slot (checked on host lists: no device sync)."""
    written: dict[int, list[tuple[int, int]]] = {}  # block -> [(first, last) offset]
    for s in seqs:
        first, end = s.prefix_len, s.prefix_len + len(s.tokens)
        for p in range(first - first % bs, end, bs):
            lo, hi = max(p, first) - p, min(p + bs, end) - 1 - p
            spans = written.setdefault(s.block_table[p // bs], [])
            if any(lo <= b and a <= hi for a, b in spans):
                raise ValueError("two new tokens of this step write the same KV slot; "
                                 "sequences must not share blocks they are still filling")
            spans.append((lo, hi))


class ModelRunner:
    """Owns the weights, the KV arena and the device-resident adapters; computes steps.
    It makes no decisions: block tables and adapter residency come from the cache.
    On CPU it relays `weights.lm_head` out column-major (same values) and keeps
    oneDNN-prepacked copies of the projections (see `PACK_CPU_LINEARS`). `kernels`: the
    Triton kernel path or the torch one (None: `kernels_wanted`)."""

    def __init__(self, weights: ModelWeights, kv: KVCache, kernels: bool | None = None) -> None:
        self.w = weights
        self.cfg = weights.config
        self.kv = kv
        self.adapters: dict[str, LoraAdapter] = {}
        self._lora: dict[str, dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        """name -> (layer, module) -> [(A^T view [in, k], B^T [k, out])]: A is transposed
        once here, not in every step (each op costs microseconds of dispatch, and a step
        runs one per adapter, layer, module and part)."""
        self.inv_freq = self.cfg.rope.inv_freq(self.cfg.head_dim).to(weights.device)
        self._packed: dict[tuple[int, str] | str, torch.Tensor] = {}
        cpu = weights.device.type == "cpu"
        if cpu:
            _lm_head_column_major(weights)
            if PACK_CPU_LINEARS and _can_pack(weights.dtype):
                self._packed = _pack_linears(weights)
        self._attn_dtype = torch.float32 if CPU_ATTENTION_FP32 and cpu else weights.dtype
        self._lora_dtype = torch.float32 if CPU_LORA_FP32 and cpu else weights.dtype
        self.slots: LoraSlots | None = None
        """Set on the kernel path: the arena adapters' offset tables."""
        if kernels if kernels is not None else kernels_wanted(weights.device):
            from fastlibra.model.kernels.step import LoraSlots
            self.slots = LoraSlots(self.cfg, kv.data)

    def add_adapter(self, adapter: LoraAdapter) -> None:
        if adapter.name in self.adapters:
            raise ValueError(f"adapter {adapter.name!r} is already loaded")
        self.adapters[adapter.name] = adapter
        self._lora[adapter.name] = {key: [(a.t(), bt) for a, bt in parts]
                                    for key, parts in adapter.parts.items()}
        if self.slots is not None:
            self.slots.add(adapter)

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]
        del self._lora[name]
        if self.slots is not None:
            self.slots.remove(name)

    # -- public entry points -------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seqs: Sequence[SeqInput]) -> torch.Tensor:
        """[len(seqs), vocab] float32 logits of each sequence's last new token, in `seqs`
        order (float32 whatever the model's dtype: sampling and argmax want it, and a
        bf16 argmax over 32,000 columns costs 4x a float one on CPU)."""
        step = self._prepare(seqs)
        logits = self._logits(self._hidden(step)[step.last_rows])
        out = torch.empty_like(logits)
        out[upload(step.order, torch.long, logits.device)] = logits
        return out

    @torch.inference_mode()
    def forward_all(self, seqs: Sequence[SeqInput]) -> list[torch.Tensor]:
        """[len(tokens), vocab] float32 logits of every new token, one tensor per sequence."""
        step = self._prepare(seqs)
        logits = self._logits(self._hidden(step))
        parts = torch.split(logits, step.lengths)
        out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        for i, part in zip(step.order, parts, strict=True):
            out[i] = part
        return out

    # -- step preparation ----------------------------------------------------------------
    def _check(self, i: int, s: SeqInput) -> None:
        bs, n = self.kv.block_size, len(s.tokens)
        if n == 0:
            raise ValueError(f"sequence {i}: no tokens to compute")
        if s.prefix_len < 0:
            raise ValueError(f"sequence {i}: negative prefix_len {s.prefix_len}")
        need = -(-(s.prefix_len + n) // bs)
        if len(s.block_table) < need:
            raise ValueError(f"sequence {i}: block table has {len(s.block_table)} blocks, "
                             f"{s.prefix_len + n} positions need {need}")
        bad = [b for b in s.block_table[:need] if not 0 <= b < self.kv.num_blocks]
        if bad:
            raise ValueError(f"sequence {i}: block ids {bad} outside the arena "
                             f"(0..{self.kv.num_blocks - 1})")
        if s.adapter is not None and s.adapter not in self.adapters:
            raise ValueError(f"sequence {i}: adapter {s.adapter!r} is not loaded")

    def _prepare(self, seqs: Sequence[SeqInput]) -> _Step:
        if not seqs:
            raise ValueError("empty batch")
        for i, s in enumerate(seqs):
            self._check(i, s)
        dev, bs = self.w.device, self.kv.block_size
        # Sort by adapter (base model first) so each adapter's rows are one slice.
        order = sorted(range(len(seqs)), key=lambda i: (seqs[i].adapter is not None,
                                                        seqs[i].adapter or ""))
        sorted_seqs = [seqs[i] for i in order]
        lengths = [len(s.tokens) for s in sorted_seqs]
        prefixes = [s.prefix_len for s in sorted_seqs]
        ctx_lens = [p + n for p, n in zip(prefixes, lengths, strict=True)]
        b, l_max = len(seqs), max(ctx_lens)
        uniform = min(lengths) == max(lengths)

        # Row r belongs to sequence q_seq[r], is its q_idx[r]-th new token, at position pos[r].
        lengths_t = upload(lengths, torch.long, dev)
        ends = lengths_t.cumsum(0)
        q_seq = torch.repeat_interleave(torch.arange(b, device=dev), lengths_t,
                                        output_size=sum(lengths))  # [T]
        q_idx = torch.arange(sum(lengths), device=dev) - (ends - lengths_t)[q_seq]  # [T]
        pos = upload(prefixes, torch.long, dev)[q_seq] + q_idx  # [T]

        need = -(-l_max // bs)  # block-table columns covering the longest context
        tables = upload([list(s.block_table[:need])
                         + [s.block_table[0]] * (need - len(s.block_table))
                         for s in sorted_seqs], torch.long, dev)
        write_block, write_off = tables[q_seq, pos // bs], pos % bs  # [T], [T]
        _check_disjoint_writes(sorted_seqs, bs)

        freqs = pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, head_dim]
        ids = upload([t for s in sorted_seqs for t in s.tokens], torch.long, dev)
        segments = self._segments(sorted_seqs, lengths)
        kernel = None
        if self.slots is not None:
            from fastlibra.model.kernels.step import KernelStep
            in_arena = [(s, e, ad.name) for s, e, ad in segments if ad.name in self.slots.slot]
            segments = [seg for seg in segments if seg[2].name not in self.slots.slot]
            kernel = KernelStep(lengths, ctx_lens, [s.block_table for s in sorted_seqs],
                                in_arena, self.slots, self.cfg, bs)
        stale = None  # the kernel path masks its loads instead
        if kernel is None and any(prefixes) and min(ctx_lens) < l_max:
            rows = [i * need * bs + p for i, n in enumerate(ctx_lens)
                    for p in range(n, min(-(-n // bs) * bs, l_max))]
            stale = upload(rows, torch.long, dev) if rows else None
        step = _Step(order=order, segments=segments,
                     lengths=lengths, ids=ids, cos=emb.cos().to(self.w.dtype),
                     sin=emb.sin().to(self.w.dtype), write_block=write_block,
                     write_off=write_off, uniform=uniform, q_seq=q_seq, q_idx=q_idx,
                     tables=tables if any(prefixes) else None, ctx_len=l_max,
                     stale=stale, attn={}, last_rows=ends - 1, kernel=kernel)
        if kernel is None:
            step.attn = self._attn_masks(step, pos, ctx_lens, prefixes)
        return step

    def _segments(self, sorted_seqs: list[SeqInput],
                  lengths: list[int]) -> list[tuple[int, int, LoraAdapter]]:
        """Token rows [start, end) of each adapter (consecutive after the sort)."""
        segments: list[tuple[int, int, LoraAdapter]] = []
        row = 0
        for s, n in zip(sorted_seqs, lengths, strict=True):
            if s.adapter is not None:
                ad = self.adapters[s.adapter]
                if segments and segments[-1][2] is ad:
                    segments[-1] = (segments[-1][0], row + n, ad)
                else:
                    segments.append((row, row + n, ad))
            row += n
        return segments

    def _attn_masks(self, step: _Step, pos: torch.Tensor, ctx_lens: list[int],
                    prefixes: list[int]) -> dict[int | None, tuple[torch.Tensor | None, bool]]:
        """Per sliding window: (mask, is_causal). No mask at all when every context has
        the same length L and either each sequence has one query (decode: it sees all
        L keys) or none has a prefix and all are the same length (plain causal)."""
        l_max = step.ctx_len
        equal = min(ctx_lens) == l_max
        decode = max(step.lengths) == 1
        plain_causal = step.uniform and not any(prefixes)
        # Query position of every padded query slot (padding rows reuse position 0 so
        # they attend to something and stay finite; their output is discarded).
        q_pos = step.pad(pos)  # [B, Q]
        k_pos = torch.arange(l_max, device=pos.device)
        ctx_len_t = torch.tensor(ctx_lens, device=pos.device)
        base = (k_pos[None, None, :] <= q_pos[:, :, None]) \
            & (k_pos[None, None, :] < ctx_len_t[:, None, None])  # [B, Q, L]
        out: dict[int | None, tuple[torch.Tensor | None, bool]] = {}
        for window in set(self.cfg.sliding_windows):
            if equal and (decode or plain_causal) and (window is None or window >= l_max):
                out[window] = (None, plain_causal and not decode)
                continue
            m = base if window is None else base & (
                k_pos[None, None, :] > q_pos[:, :, None] - window)
            out[window] = (m[:, None], False)
        return out

    # -- the model -----------------------------------------------------------------------
    def _hidden(self, step: _Step) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] of every new token, in step (sorted) order."""
        h = self.w.embed_tokens[step.ids]
        for layer in range(self.cfg.num_layers):
            h = h + self._attention(layer, _rms_norm(h, self.w.layers[layer].input_norm,
                                                     self.cfg.rms_norm_eps), step)
            h = h + self._mlp(layer, _rms_norm(h, self.w.layers[layer].post_norm,
                                               self.cfg.rms_norm_eps), step)
        return _rms_norm(h, self.w.norm, self.cfg.rms_norm_eps)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """[rows, vocab]; one row reads the column-major weight fastest, more the packed one."""
        packed = self._packed.get("lm_head")
        if packed is None or h.shape[0] == 1:
            return F.linear(h, self.w.lm_head).float()
        return _packed_linear(h, packed, None).float()

    def _linear(self, layer: int, module: str, x: torch.Tensor, step: _Step) -> torch.Tensor:
        """x @ W.T (+ bias) for every row, plus each adapter's low-rank update on its
        segment of rows (SGMV: segmented gather-free matmuls; base-model rows get none).
        The scaling is addmm's alpha: no extra op, and no weight is ever rescaled."""
        lw = self.w.layers[layer]
        packed = self._packed.get((layer, module))
        y = F.linear(x, getattr(lw, module), lw.biases.get(module)) if packed is None \
            else _packed_linear(x, packed, lw.biases.get(module))
        if step.kernel is not None:
            step.kernel.lora(layer, module, x, y)
        d = self._lora_dtype  # see CPU_LORA_FP32
        for start, end, ad in step.segments:
            parts = self._lora[ad.name].get((layer, module))
            if parts:
                xs, ys = x[start:end].to(d), y[start:end]  # ys += scaling * xs A^T B^T
                for a_t, bt in parts:
                    if d is x.dtype:
                        ys.addmm_(torch.mm(xs, a_t), bt, alpha=ad.scaling)
                    else:  # widened: the product is added to the narrower rows in place
                        ys.add_(torch.mm(torch.mm(xs, a_t.to(d)), bt.to(d)), alpha=ad.scaling)
        return y

    def _context(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                 step: _Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, nkv, L, hd] of each sequence's whole context, in the
        attention dtype (widened while still contiguous: half the cost of widening the
        transposed view)."""
        a = self._attn_dtype
        if step.tables is None:  # no cached prefix: the context is this step's K/V
            return step.pad(k.to(a)).transpose(1, 2), step.pad(v.to(a)).transpose(1, 2)
        b, nblk = step.tables.shape
        blocks = step.tables.flatten()  # [B * nblk]

        def gather(cache: torch.Tensor) -> torch.Tensor:
            # Whole blocks (contiguous chunks; index_select copies them ~4x faster than
            # advanced indexing): [B * nblk, bs, nkv, hd] -> [B, nkv, L, hd]
            ctx = cache.index_select(0, blocks)
            if step.stale is not None:
                ctx.view(-1, *ctx.shape[2:]).index_fill_(0, step.stale, 0)
            ctx = ctx.to(a)
            return ctx.view(b, -1, *ctx.shape[2:])[:, :step.ctx_len].transpose(1, 2)

        return gather(self.kv.k(layer)), gather(self.kv.v(layer))

    def _attention(self, layer: int, x: torch.Tensor, step: _Step) -> torch.Tensor:
        cfg = self.cfg
        t, hd, nh, nkv = x.shape[0], cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = self._linear(layer, "q_proj", x, step).view(t, nh, hd)
        k = self._linear(layer, "k_proj", x, step).view(t, nkv, hd)
        v = self._linear(layer, "v_proj", x, step).view(t, nkv, hd)
        q = q * step.cos + _rotate_half(q) * step.sin
        k = k * step.cos + _rotate_half(k) * step.sin

        self.kv.k(layer)[step.write_block, step.write_off] = k
        self.kv.v(layer)[step.write_block, step.write_off] = v
        if step.kernel is not None:
            out = step.kernel.attention(q, self.kv.k(layer), self.kv.v(layer),
                                        cfg.sliding_windows[layer])
            return self._linear(layer, "o_proj", out.view(t, nh * hd), step)
        keys, vals = self._context(layer, k, v, step)  # [B, nkv, L, hd]
        # KV head g serves query heads g*rep .. g*rep+rep-1 (SDPA broadcasts, no copy).
        mask, causal = step.attn[cfg.sliding_windows[layer]]
        a = self._attn_dtype  # see CPU_ATTENTION_FP32
        out = F.scaled_dot_product_attention(
            step.pad(q.to(a)).transpose(1, 2), keys, vals, attn_mask=mask,
            is_causal=causal, enable_gqa=nh != nkv)  # [B, nh, Q, hd]
        out = step.unpad(out.transpose(1, 2)).reshape(t, nh * hd).to(x.dtype)
        return self._linear(layer, "o_proj", out, step)

    def _mlp(self, layer: int, x: torch.Tensor, step: _Step) -> torch.Tensor:
        gate = self._linear(layer, "gate_proj", x, step)
        up = self._linear(layer, "up_proj", x, step)
        return self._linear(layer, "down_proj", F.silu(gate, inplace=True).mul_(up), step)
