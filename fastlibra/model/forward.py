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
      whole context (cached prefix + new rows) back through its block table, with a
      causal mask offset by the prefix (and a sliding window where the model has one)
    logits of each sequence's last row (or every row), in the caller's order
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastlibra.model.loader import ModelConfig, ModelWeights
from fastlibra.model.lora import LoraAdapter


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


@dataclass
class _Step:
    """Index tensors of one step, shared by every layer (rows in adapter-sorted order)."""

    order: list[int]  # step row-group i is caller's sequence order[i]
    segments: list[tuple[int, int, LoraAdapter]]  # token rows [s, e) use this adapter
    cos: torch.Tensor  # [T, 1, head_dim]
    sin: torch.Tensor  # [T, 1, head_dim]
    write_block: torch.Tensor  # [T] block id of each new row's K/V
    write_off: torch.Tensor  # [T] offset inside that block
    q_seq: torch.Tensor  # [T] padded-batch index of each row
    q_idx: torch.Tensor  # [T] index of the row inside its sequence's new tokens
    ctx_block: torch.Tensor  # [B, L] block of each context position (0 past the end)
    ctx_off: torch.Tensor  # [B, L]
    masks: dict[int | None, torch.Tensor]  # window -> [B, 1, Q, L] bool, True = attend
    last_rows: torch.Tensor  # [B] flat row of each sequence's last new token
    lengths: list[int]  # new tokens per sequence (sorted order)


class ModelRunner:
    """Owns the weights, the KV arena and the device-resident adapters; computes steps.
    It makes no decisions: block tables and adapter residency come from the cache."""

    def __init__(self, weights: ModelWeights, kv: KVCache) -> None:
        self.w = weights
        self.cfg = weights.config
        self.kv = kv
        self.adapters: dict[str, LoraAdapter] = {}
        self.inv_freq = self.cfg.rope.inv_freq(self.cfg.head_dim).to(weights.device)

    def add_adapter(self, adapter: LoraAdapter) -> None:
        if adapter.name in self.adapters:
            raise ValueError(f"adapter {adapter.name!r} is already loaded")
        self.adapters[adapter.name] = adapter

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]

    # -- public entry points -------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seqs: Sequence[SeqInput]) -> torch.Tensor:
        """[len(seqs), vocab] logits of each sequence's last new token, in `seqs` order."""
        step = self._prepare(seqs)
        h = self._hidden(seqs, step)[step.last_rows]
        logits = F.linear(h, self.w.lm_head)
        out = torch.empty_like(logits)
        out[step.order] = logits
        return out

    @torch.inference_mode()
    def forward_all(self, seqs: Sequence[SeqInput]) -> list[torch.Tensor]:
        """[len(tokens), vocab] logits of every new token, one tensor per sequence."""
        step = self._prepare(seqs)
        logits = F.linear(self._hidden(seqs, step), self.w.lm_head)
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
        ctx_lens = [s.prefix_len + n for s, n in zip(sorted_seqs, lengths, strict=True)]
        b, q_max, l_max = len(seqs), max(lengths), max(ctx_lens)

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

        positions, q_seq, q_idx, ctx_block, ctx_off = [], [], [], [], []
        for j, (s, n, c) in enumerate(zip(sorted_seqs, lengths, ctx_lens, strict=True)):
            positions.extend(range(s.prefix_len, c))
            q_seq.extend([j] * n)
            q_idx.extend(range(n))
            table = list(s.block_table)
            ctx_block.append([table[p // bs] for p in range(c)] + [0] * (l_max - c))
            ctx_off.append([p % bs for p in range(c)] + [0] * (l_max - c))
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        q_seq_t = torch.tensor(q_seq, dtype=torch.long, device=dev)
        q_idx_t = torch.tensor(q_idx, dtype=torch.long, device=dev)
        ctx_block_t = torch.tensor(ctx_block, dtype=torch.long, device=dev)
        ctx_off_t = torch.tensor(ctx_off, dtype=torch.long, device=dev)
        write_block = ctx_block_t[q_seq_t, pos]
        write_off = ctx_off_t[q_seq_t, pos]
        slots = (write_block * bs + write_off).tolist()
        if len(set(slots)) != len(slots):
            raise ValueError("two new tokens of this step write the same KV slot; "
                             "sequences must not share blocks they are still filling")

        freqs = pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = emb.cos().to(self.w.dtype), emb.sin().to(self.w.dtype)

        # Query position of every padded query slot (padding rows reuse position 0 so
        # they attend to something and stay finite; their output is discarded).
        q_pos = torch.zeros(b, q_max, dtype=torch.long, device=dev)
        q_pos[q_seq_t, q_idx_t] = pos
        k_pos = torch.arange(l_max, device=dev)
        ctx_len_t = torch.tensor(ctx_lens, device=dev)
        base = (k_pos[None, None, :] <= q_pos[:, :, None]) \
            & (k_pos[None, None, :] < ctx_len_t[:, None, None])
        masks: dict[int | None, torch.Tensor] = {}
        for window in set(self.cfg.sliding_windows):
            m = base if window is None else base & (
                k_pos[None, None, :] > q_pos[:, :, None] - window)
            masks[window] = m[:, None]

        ends = torch.tensor(lengths, device=dev).cumsum(0)
        return _Step(order=order, segments=segments, cos=cos, sin=sin,
                     write_block=write_block, write_off=write_off, q_seq=q_seq_t,
                     q_idx=q_idx_t, ctx_block=ctx_block_t, ctx_off=ctx_off_t, masks=masks,
                     last_rows=ends - 1, lengths=lengths)

    # -- the model -----------------------------------------------------------------------
    def _hidden(self, seqs: Sequence[SeqInput], step: _Step) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] of every new token, in step (sorted) order."""
        ids = torch.tensor([t for i in step.order for t in seqs[i].tokens],
                           dtype=torch.long, device=self.w.device)
        h = self.w.embed_tokens[ids]
        for layer in range(self.cfg.num_layers):
            h = h + self._attention(layer, _rms_norm(h, self.w.layers[layer].input_norm,
                                                     self.cfg.rms_norm_eps), step)
            h = h + self._mlp(layer, _rms_norm(h, self.w.layers[layer].post_norm,
                                               self.cfg.rms_norm_eps), step)
        return _rms_norm(h, self.w.norm, self.cfg.rms_norm_eps)

    def _linear(self, layer: int, module: str, x: torch.Tensor, step: _Step) -> torch.Tensor:
        """x @ W.T (+ bias) for every row, plus each adapter's low-rank update on its
        segment of rows (SGMV: segmented gather-free matmuls; base-model rows get none)."""
        lw = self.w.layers[layer]
        y = F.linear(x, getattr(lw, module), lw.biases.get(module))
        for start, end, ad in step.segments:
            pair = ad.weights.get((layer, module))
            if pair is not None:
                y[start:end] += (x[start:end] @ pair.a.T) @ pair.b.T * ad.scaling
        return y

    def _attention(self, layer: int, x: torch.Tensor, step: _Step) -> torch.Tensor:
        cfg = self.cfg
        t, hd, nh, nkv = x.shape[0], cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = self._linear(layer, "q_proj", x, step).view(t, nh, hd)
        k = self._linear(layer, "k_proj", x, step).view(t, nkv, hd)
        v = self._linear(layer, "v_proj", x, step).view(t, nkv, hd)
        q = q * step.cos + _rotate_half(q) * step.sin
        k = k * step.cos + _rotate_half(k) * step.sin

        k_cache, v_cache = self.kv.k(layer), self.kv.v(layer)
        k_cache[step.write_block, step.write_off] = k
        v_cache[step.write_block, step.write_off] = v
        # [B, L, nkv, hd] -> [B, nh, L, hd]: each sequence's whole context, read back
        # through its block table; KV head g serves query heads g*rep .. g*rep+rep-1.
        rep = nh // nkv
        keys = k_cache[step.ctx_block, step.ctx_off].transpose(1, 2)
        vals = v_cache[step.ctx_block, step.ctx_off].transpose(1, 2)
        if rep > 1:
            keys = keys.repeat_interleave(rep, dim=1)
            vals = vals.repeat_interleave(rep, dim=1)
        b, q_max = step.ctx_block.shape[0], max(step.lengths)
        q_pad = q.new_zeros(b, q_max, nh, hd)
        q_pad[step.q_seq, step.q_idx] = q
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), keys, vals,
            attn_mask=step.masks[cfg.sliding_windows[layer]])  # [B, nh, Q, hd]
        out = out.transpose(1, 2)[step.q_seq, step.q_idx].reshape(t, nh * hd)
        return self._linear(layer, "o_proj", out, step)

    def _mlp(self, layer: int, x: torch.Tensor, step: _Step) -> torch.Tensor:
        gate = self._linear(layer, "gate_proj", x, step)
        up = self._linear(layer, "up_proj", x, step)
        return self._linear(layer, "down_proj", F.silu(gate) * up, step)
