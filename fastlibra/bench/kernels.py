"""`fastlibra bench kernels`: the forward pass through the Triton kernels against the
torch path, on one random model built in device memory (nothing is written to disk).

    weights   random, Llama-3-8B-shaped by default, initialised on the device
    arena     one KVCache; adapters (rank r, every linear layer) packed into its blocks by
              `ArenaLayout`, read in place by both paths (the torch path loops over them)
    steps     B decodes after `--context` cached tokens; sequence i uses adapter i mod N
    checks    logits of both paths on a mixed step (a prefill chunk after a cached prefix
              plus decodes, adapters and base rows), host syncs inside one kernel-path step
    prints    one table: decode step ms per batch x adapters, torch vs kernels; and one
              layer's attention, paged kernel vs SDPA on the same shapes unpaged
              (contiguous [B, heads, L, head_dim]; FlashAttention's backend on CUDA)
"""

from __future__ import annotations

import os
import time
import warnings
from functools import partial
from pathlib import Path

import torch

from fastlibra.bench.report import run_facts, write_json
from fastlibra.config import LORA_TARGETS
from fastlibra.model.forward import KVCache, ModelRunner, SeqInput
from fastlibra.model.kernels.attention import (
    kv_splits,
    paged_attention,
    tile_tokens,
    work_items,
)
from fastlibra.model.loader import LayerWeights, ModelConfig, ModelWeights, RopeConfig
from fastlibra.model.lora import ArenaLayout, LoraAdapter, LoraWeights


def random_weights(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=dtype)
                * shape[-1] ** -0.5)

    h, hd = cfg.hidden_size, cfg.head_dim
    layers = [LayerWeights(torch.ones(h, dtype=dtype, device=device),
                           w(cfg.num_heads * hd, h), w(cfg.num_kv_heads * hd, h),
                           w(cfg.num_kv_heads * hd, h), w(h, cfg.num_heads * hd),
                           torch.ones(h, dtype=dtype, device=device),
                           w(cfg.intermediate_size, h), w(cfg.intermediate_size, h),
                           w(h, cfg.intermediate_size))
              for _ in range(cfg.num_layers)]
    return ModelWeights(cfg, w(cfg.vocab_size, h), layers, torch.ones(h, dtype=dtype,
                        device=device), w(cfg.vocab_size, h), dtype, device, Path("random"))


def place_adapters(runners: list[ModelRunner], n: int, rank: int, first_block: int) -> int:
    """N random adapters packed into arena blocks from `first_block` on and installed in
    every runner (they share the arena). Returns the next free block."""
    r0 = runners[0]
    cfg, dev, dt = r0.cfg, r0.w.device, r0.w.dtype
    g = torch.Generator(device=dev).manual_seed(1)
    block = first_block
    for i in range(n):
        weights = {}
        for layer in range(cfg.num_layers):
            for m in LORA_TARGETS:
                fan_in, fan_out = cfg.projection_dims(m)
                weights[(layer, m)] = LoraWeights(
                    torch.randn(rank, fan_in, generator=g, device=dev, dtype=dt) * 0.02,
                    torch.randn(fan_out, rank, generator=g, device=dev, dtype=dt) * 0.02)
        ad = LoraAdapter(f"lora{i}", rank, 2.0, LORA_TARGETS, weights, Path("random"))
        layout = ArenaLayout(ad, r0.kv.block_elems)
        flat = [r0.kv.data[b].view(-1) for b in range(block, block + layout.num_blocks)]
        layout.write(ad, flat)
        block += layout.num_blocks
        for r in runners:
            r.add_adapter(LoraAdapter(ad.name, rank, ad.scaling, LORA_TARGETS, {}, ad.path,
                                      layout.views(flat)))
    return block


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, warmup: int, reps: int, device: torch.device) -> float:
    """Milliseconds per call of `fn`, the device drained before and after."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


def attention_vs_sdpa(cfg: ModelConfig, dt: torch.dtype, dev: torch.device, bs: int,
                      cases: list[tuple[int, int, int]], warmup: int,
                      reps: int) -> list[dict]:
    """(batch, new tokens, context) cases: our kernel over scrambled paged blocks against
    SDPA (causal, GQA) over contiguous tensors of the same sizes."""
    import torch.nn.functional as F

    out = []
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for b, n, ctx in cases:
        per = -(-ctx // bs)
        k = torch.randn(b * per, bs, nkv, hd, device=dev, dtype=dt)
        v = torch.randn_like(k)
        perm = torch.randperm(b * per, device=dev).to(torch.int32)
        tables = perm.view(b, per)
        i32 = dict(dtype=torch.int32, device=dev)
        cu_q = torch.arange(0, b * n + 1, n, **i32)
        ctx_t = torch.full((b,), ctx, **i32)
        block_q = tile_tokens(nh, nkv, n)
        seq, q0 = work_items([n] * b, block_q)
        seq_t, q0_t = torch.tensor(seq, **i32), torch.tensor(q0, **i32)
        q = torch.randn(b * n, nh, hd, device=dev, dtype=dt)
        splits = kv_splits(len(seq) * nkv, ctx, n)  # as a step would slice the keys
        ours = _timed(partial(paged_attention, q, k, v, tables, cu_q, ctx_t, seq_t, q0_t,
                              block_q, splits=splits, max_ctx=ctx), warmup, reps, dev)
        qd = torch.randn(b, nh, n, hd, device=dev, dtype=dt)
        kd = torch.randn(b, nkv, ctx, hd, device=dev, dtype=dt)
        vd = torch.randn_like(kd)
        # decode: one query sees every key (no mask); a prefill from 0 is plain causal
        sdpa = partial(F.scaled_dot_product_attention, qd, kd, vd, is_causal=n > 1 and n == ctx,
                       enable_gqa=nh != nkv)
        theirs = _timed(sdpa, warmup, reps, dev)
        out.append({"batch": b, "new_tokens": n, "context": ctx, "splits": splits,
                    "paged_ms": ours, "sdpa_ms": theirs})
    return out


def count_syncs(runner: ModelRunner, seqs: list[SeqInput]) -> int | None:
    """Host syncs CUDA reports inside one forward pass (None off CUDA)."""
    if runner.w.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.forward(seqs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run_kernel_bench(args) -> int:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on CPU the kernels run only in Triton's interpreter: "
                         "set TRITON_INTERPRET=1 (and use a tiny shape)")
    dt = getattr(torch, args.dtype)
    cfg = ModelConfig("llama", args.vocab, args.hidden, args.layers, args.heads,
                      args.kv_heads, args.hidden // args.heads, args.intermediate, 1e-5,
                      RopeConfig(theta=500000.0), 8192)
    weights = random_weights(cfg, dt, dev)
    bs = args.block_size
    ctx_blocks = -(-(args.context + 8) // bs)
    probe = KVCache(cfg, 1, bs, dt, "meta")
    per_adapter = ArenaLayout(LoraAdapter("x", args.rank, 1.0, LORA_TARGETS, {
        (i, m): LoraWeights(torch.empty(args.rank, cfg.projection_dims(m)[0], device="meta"),
                            torch.empty(cfg.projection_dims(m)[1], args.rank, device="meta"))
        for i in range(cfg.num_layers) for m in LORA_TARGETS}, Path(".")), probe.block_elems)
    nblocks = max(args.batches) * ctx_blocks + args.adapters * per_adapter.num_blocks + 1
    kv = KVCache(cfg, nblocks, bs, dt, dev)
    kern, plain = ModelRunner(weights, kv, kernels=True), ModelRunner(weights, kv, kernels=False)
    place_adapters([kern, plain], args.adapters, args.rank, max(args.batches) * ctx_blocks)
    names = sorted(kern.adapters)

    def decodes(b: int, adapters: bool) -> list[SeqInput]:
        return [SeqInput([7], args.context, list(range(i * ctx_blocks, (i + 1) * ctx_blocks)),
                         names[i % len(names)] if adapters else None) for i in range(b)]

    # Correctness at this shape: a chunk after a cached prefix beside decodes (both paths
    # write the same K/V into the same slots, so they may share the arena).
    g = torch.Generator().manual_seed(2)
    b = min(8, max(args.batches))
    mixed = [SeqInput(torch.randint(3, cfg.vocab_size, (args.chunk,), generator=g).tolist(),
                      args.context - args.chunk, list(range(ctx_blocks)), names[0])]
    mixed += [SeqInput([int(t)], args.context, list(range(i * ctx_blocks, (i + 1) * ctx_blocks)),
                       names[i % len(names)] if i % 3 else None)
              for i, t in enumerate(torch.randint(3, cfg.vocab_size, (b,), generator=g))
              if i > 0]
    want, got = plain.forward_all(mixed), kern.forward_all(mixed)
    diff = max(float((w - k).abs().max()) for w, k in zip(want, got, strict=True))
    agree = sum(int((w.argmax(-1) == k.argmax(-1)).sum()) for w, k in zip(want, got,
                                                                          strict=True))
    rows = sum(w.shape[0] for w in want)
    print(f"mixed step ({args.chunk}-token chunk after {args.context - args.chunk} cached + "
          f"{b - 1} decodes): max |logit diff| {diff:.2e}, argmax agrees on {agree}/{rows}")

    results = []
    for batch in args.batches:
        for with_adapters in (False, True):
            seqs = decodes(batch, with_adapters)
            t_torch = _timed(partial(plain.forward, seqs), args.warmup, args.reps, dev)
            t_kern = _timed(partial(kern.forward, seqs), args.warmup, args.reps, dev)
            results.append({"batch": batch, "adapters": min(batch, len(names))
                            if with_adapters else 0, "torch_ms": t_torch, "kernels_ms": t_kern})
    syncs = count_syncs(kern, decodes(max(args.batches), True))
    attn = attention_vs_sdpa(cfg, dt, dev, bs, [(b, 1, args.context) for b in args.batches]
                             + [(1, 1, 8 * args.context), (1, args.chunk, args.chunk)],
                             args.warmup, args.reps)

    print(f"\ndecode step, context {args.context}, {cfg.num_layers} layers x hidden "
          f"{cfg.hidden_size} ({cfg.num_heads}/{cfg.num_kv_heads} heads), {args.dtype}, "
          f"rank {args.rank} on every linear layer, {dev}")
    print(f"{'batch':>5} {'adapters':>8} {'torch ms':>9} {'kernels ms':>10} {'speedup':>8}")
    for r in results:
        print(f"{r['batch']:5d} {r['adapters']:8d} {r['torch_ms']:9.2f} {r['kernels_ms']:10.2f} "
              f"{r['torch_ms'] / r['kernels_ms']:7.2f}x")
    print(f"\none layer's attention ({args.dtype}): paged kernel vs SDPA, unpaged")
    print(f"{'batch':>5} {'new':>5} {'context':>7} {'slices':>6} {'paged ms':>9} {'SDPA ms':>8} "
          f"{'ratio':>6}")
    for a in attn:
        print(f"{a['batch']:5d} {a['new_tokens']:5d} {a['context']:7d} {a['splits']:6d} "
              f"{a['paged_ms']:9.3f} {a['sdpa_ms']:8.3f} {a['paged_ms'] / a['sdpa_ms']:6.2f}")
    if syncs is not None:
        print(f"host syncs inside one kernel-path step (batch {max(args.batches)}): {syncs}")
    if args.json:
        write_json(args.json, {"machine": run_facts(torch.get_num_threads()),
                               "device": torch.cuda.get_device_name(dev)
                               if dev.type == "cuda" else "cpu",
                               "args": {k: v for k, v in vars(args).items()
                                        if isinstance(v, int | float | str | list)},
                               "mixed_max_logit_diff": diff, "mixed_argmax_agree": agree,
                               "mixed_rows": rows, "steps": results, "attention": attn,
                               "syncs": syncs})
    return 0
