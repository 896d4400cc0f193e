"""`fastlibra bench model`: our paged model runner against transformers, in one process.

    build (temp dir)             a random Llama (transformers) + a PEFT LoRA (rank 16, q/k/v/o)
    load                         ours: load_model / load_adapter   baseline: from_pretrained
    (a) decode, batch 1 and 16   same prompts (equal lengths), greedy, KV cache on both sides:
                                   ours  prefill, then `decode` ModelRunner.forward steps
                                   hf    model.generate(max_new_tokens=decode + 1)
                                 timed: the decode steps only (hf: between the first and the
                                 last call of a logits processor = after prefill .. after the
                                 last step), tokens/s = batch * decode / seconds
    (b) adapter cost             ours: prefill of `prefill_len` tokens with the adapter
                                 against the same prefill on the base model
    (info) prefill               ours against hf forward (logits of the last token only)

Every measurement: `warmup` untimed runs, then `reps` timed runs, interleaved between the
two sides, reported as medians. Both sides run in this process with the same torch
thread count. Default model (about 88 M parameters, 350 MB in float32):

    hidden 768, 6 layers, 12 query heads / 4 KV heads of width 64 (GQA),
    intermediate 2048, vocab 32000, float32 (`--dtype bfloat16`: both sides in bf16)
"""

from __future__ import annotations

import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from fastlibra.bench.report import run_facts, write_json
from fastlibra.model import KVCache, ModelRunner, SeqInput, load_adapter, load_model
from fastlibra.model.lora import ArenaLayout
from fastlibra.model.tiny import save_lora

BLOCK_SIZE = 16
TARGETS = {"decode_b1": 1.0, "decode_b16": 3.0, "adapter_prefill": 1.3}


def _status(msg: str) -> None:
    print(f"[bench model] {msg}", file=sys.stderr, flush=True)


# -- the model on disk -----------------------------------------------------------------
def build_model(root: Path, args) -> tuple[Path, Path]:
    """A random Llama saved by transformers and a rank-`args.rank` LoRA on q/k/v/o with
    non-zero A and B in PEFT's file layout (`tiny.save_lora`, so no peft is needed here);
    returns (model dir, adapter dir)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=max(4096, args.prefill_len * 2))
    base = root / "base"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base, safe_serialization=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    return base, save_lora(root / "adapter", base, cfg, args.rank, gen)


def load_hf(base: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def load_ours(base: Path, adapter: Path, args) -> ModelRunner:
    dtype = getattr(torch, args.dtype)
    weights = load_model(base, dtype=dtype, device="cpu")
    per_seq = -(-(args.prompt_len + args.decode_tokens + 1) // BLOCK_SIZE)
    need = max(max(args.batches) * per_seq, -(-args.prefill_len // BLOCK_SIZE))
    lora = load_adapter(adapter, weights.config, max_rank=args.rank, name="lora",
                        dtype=dtype, device="cpu")
    # As in the engine: the adapter's weights live in arena blocks after the KV blocks,
    # and the forward pass multiplies views of them.
    cfg = weights.config
    layout = ArenaLayout(lora, BLOCK_SIZE * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim)
    kv = KVCache(weights.config, need + layout.num_blocks, BLOCK_SIZE, dtype, "cpu")
    blocks = [kv.data[b].view(-1) for b in range(need, need + layout.num_blocks)]
    layout.write(lora, blocks)
    runner = ModelRunner(weights, kv)
    runner.add_adapter(replace(lora, weights={}, parts=layout.views(blocks)))
    return runner


# -- timed runs --------------------------------------------------------------------------
def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def ours_decode(runner: ModelRunner, prompts: list[list[int]], steps: int) -> float:
    """Seconds for `steps` greedy decode steps of the whole batch (after an untimed
    prefill), including argmax and building the step's inputs, as an engine loop would."""
    per_seq = -(-(len(prompts[0]) + steps + 1) // BLOCK_SIZE)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    logits = runner.forward([SeqInput(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
    lens = [len(p) for p in prompts]
    start = time.perf_counter()
    for _ in range(steps):
        nxt = logits.argmax(-1).tolist()
        logits = runner.forward([SeqInput([x], n, t)
                                 for x, n, t in zip(nxt, lens, tables, strict=True)])
        lens = [n + 1 for n in lens]
    return time.perf_counter() - start


def hf_decode(model, prompts: list[list[int]], steps: int) -> float:
    """Seconds between the logits processor's first call (prefill done) and its last
    (after `steps` decode forwards) in one greedy `generate`."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                       min_new_tokens=steps + 1, do_sample=False, use_cache=True,
                       logits_processor=LogitsProcessorList([Stamp()]))
    assert len(stamps) == steps + 1, len(stamps)
    return stamps[-1] - stamps[0]


def ours_prefill(runner: ModelRunner, tokens: list[int], adapter: str | None) -> float:
    table = list(range(-(-len(tokens) // BLOCK_SIZE)))
    start = time.perf_counter()
    runner.forward([SeqInput(tokens, 0, table, adapter)])
    return time.perf_counter() - start


def hf_prefill(model, tokens: list[int]) -> float:
    ids = torch.tensor([tokens])
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def measure(runs: dict[str, Callable[[], float]], warmup: int, reps: int) -> dict[str, dict]:
    """Run each side `warmup` times, then `reps` rounds interleaved; median seconds."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            times[k].append(fn())
    return {k: {"median_s": statistics.median(v), "runs_s": v} for k, v in times.items()}


# -- the benchmark -----------------------------------------------------------------------
def _decode_case(runner, hf, args, batch: int) -> dict:
    prompts = _prompts(batch, args.prompt_len, args.vocab, args.seed + batch)
    steps = args.decode_tokens
    res = measure({"ours": lambda: ours_decode(runner, prompts, steps),
                   "transformers": lambda: hf_decode(hf, prompts, steps)},
                  args.warmup, args.reps)
    tok = batch * steps
    ours, base = tok / res["ours"]["median_s"], tok / res["transformers"]["median_s"]
    return {"batch": batch, "prompt_len": args.prompt_len, "decode_tokens": steps,
            "ours_tok_s": ours, "transformers_tok_s": base, "ratio": ours / base,
            "runs_s": {k: v["runs_s"] for k, v in res.items()}}


def _prefill_case(runner, hf, args) -> dict:
    tokens = _prompts(1, args.prefill_len, args.vocab, args.seed)[0]
    res = measure({"base": lambda: ours_prefill(runner, tokens, None),
                   "adapter": lambda: ours_prefill(runner, tokens, "lora"),
                   "transformers": lambda: hf_prefill(hf, tokens)},
                  args.warmup, args.reps)
    base, lora, hf_s = (res[k]["median_s"] for k in ("base", "adapter", "transformers"))
    return {"tokens": args.prefill_len, "base_s": base, "adapter_s": lora,
            "transformers_s": hf_s, "adapter_ratio": lora / base,
            "speedup_vs_transformers": hf_s / base,
            "runs_s": {k: v["runs_s"] for k, v in res.items()}}


def _table(out: dict) -> str:
    rows = [f"{'measure':<34} {'ours':>12} {'transformers':>13} {'ratio':>7} "
            f"{'target':>8} {'met':>4}"]
    for d in out["decode"]:
        key = f"decode_b{d['batch']}"
        tgt = TARGETS.get(key)
        met = "" if tgt is None else ("yes" if d["ratio"] >= tgt else "NO")
        rows.append(f"{'decode tok/s, batch ' + str(d['batch']):<34} {d['ours_tok_s']:>12.1f} "
                    f"{d['transformers_tok_s']:>13.1f} {d['ratio']:>6.2f}x "
                    f"{'>= ' + str(tgt) + 'x' if tgt else '':>8} {met:>4}")
    p = out["prefill"]
    rows.append(f"{'prefill ' + str(p['tokens']) + ' tok, s (base model)':<34} "
                f"{p['base_s']:>12.3f} {p['transformers_s']:>13.3f} "
                f"{p['speedup_vs_transformers']:>6.2f}x {'':>8} {'':>4}")
    tgt = TARGETS["adapter_prefill"]
    met = "yes" if p["adapter_ratio"] <= tgt else "NO"
    rows.append(f"{'prefill cost of an adapter, ours':<34} {p['adapter_s']:>12.3f} "
                f"{'(base ' + format(p['base_s'], '.3f') + ')':>13} "
                f"{p['adapter_ratio']:>6.2f}x {'<= ' + str(tgt) + 'x':>8} {met:>4}")
    return "\n".join(rows)


def _check_finite(out: dict) -> None:
    vals = [d[k] for d in out["decode"] for k in ("ours_tok_s", "transformers_tok_s")]
    vals += [out["prefill"][k] for k in ("base_s", "adapter_s", "transformers_s")]
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise RuntimeError(f"non-positive or non-finite measurement in {vals}")


def run_model_bench(args) -> int:
    threads = args.threads
    torch.set_num_threads(threads)
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
             "kv_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
             "intermediate": args.intermediate, "vocab": args.vocab, "dtype": args.dtype,
             "lora_rank": args.rank, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    _status(f"{platform.python_version()}, torch {torch.__version__}, {threads} threads; "
            f"model {shape}")
    with tempfile.TemporaryDirectory(prefix="fastlibra-bench-model-") as tmp:
        t0 = time.perf_counter()
        base, adapter = build_model(Path(tmp), args)
        _status(f"built the model and adapter in {time.perf_counter() - t0:.1f} s")
        runner, hf = load_ours(base, adapter, args), load_hf(base, args.dtype)
        params = sum(p.numel() for p in hf.parameters())
        _status(f"loaded both ({params / 1e6:.1f} M parameters)")
        decode = []
        for b in args.batches:
            _status(f"decode, batch {b}: {args.warmup} warm-up + {args.reps} reps of "
                    f"{args.decode_tokens} steps after a {args.prompt_len}-token prompt")
            decode.append(_decode_case(runner, hf, args, b))
            _status(f"  ours {decode[-1]['ours_tok_s']:.1f} tok/s, transformers "
                    f"{decode[-1]['transformers_tok_s']:.1f} tok/s")
        _status(f"prefill of {args.prefill_len} tokens: base / adapter / transformers")
        prefill = _prefill_case(runner, hf, args)
    out = {"machine": run_facts(threads), "model": {**shape, "parameters": params},
           "settings": {"warmup": args.warmup, "reps": args.reps,
                        "block_size": BLOCK_SIZE, "seed": args.seed},
           "decode": decode, "prefill": prefill}
    _check_finite(out)
    out["targets"] = _targets(out)
    print(_table(out))
    if args.json:
        write_json(args.json, out, _status)
    return 0


def _targets(out: dict) -> dict[str, dict]:
    got = {f"decode_b{d['batch']}": d["ratio"] for d in out["decode"]}
    got["adapter_prefill"] = out["prefill"]["adapter_ratio"]
    res = {}
    for key, tgt in TARGETS.items():
        if key in got:
            met = got[key] <= tgt if key == "adapter_prefill" else got[key] >= tgt
            res[key] = {"ratio": got[key], "target": tgt, "met": met}
    return res
