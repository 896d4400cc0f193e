"""`fastlibra bench structured`: what structured output costs the decode loop.

    model      `bench replay`'s shape (hidden 512, 8 layers) with the byte-level tokenizer,
               so JSON is writable token by token, and its vocabulary (263: a smaller
               output projection than replay's 4096 makes the step cheaper and the
               mask's share larger; and free rows then sample real tokens whose text
               the detokenizer emits, as a real model's do)
    batch      `--batch` requests (default 16), 16-token prompts, `--tokens` new tokens
               each, temperature 1, ignore_eos: every step decodes the whole batch
    free       no constraint
    json       every row constrained by a JSON schema (an array of at least 8 objects,
               longer than `--tokens`, so the grammar stays open to the end)

Free and constrained runs alternate `--reps` times after a warm-up; the headline is the
constrained batch's wall time over the free batch's (target <= 1.10).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from fastlibra.bench.report import run_facts, write_json
from fastlibra.model.tiny import BYTE_VOCAB, build_tiny_model

ITEM = {"type": "object", "additionalProperties": False, "required": ["name", "score", "tags"],
        "properties": {"name": {"type": "string"}, "score": {"type": "number"},
                       "tags": {"type": "array", "items": {"type": "string"}}}}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 8}
TARGET_RATIO = 1.10


def run_structured(args) -> int:
    from fastlibra.llm import LLM
    from fastlibra.model.sampling import SamplingParams, StructuredOutput

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base, _ = build_tiny_model(
            Path(tmp), num_adapters=0, byte_tokenizer=True, vocab_size=BYTE_VOCAB,
            hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads)
        llm = LLM(base, device="cpu", dtype="float32", device_memory=256 << 20,
                  host_memory=16 << 20, max_num_seqs=args.batch)
    prompts = [[3 + (7 * i + j) % 250 for j in range(16)] for i in range(args.batch)]
    free = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.tokens, ignore_eos=True)
            for i in range(args.batch)]
    constrained = [replace(p, structured=StructuredOutput(json=SCHEMA)) for p in free]
    times: dict[str, list[float]] = {"free": [], "json": []}
    texts: list[str] = []
    for rep in range(args.reps + 1):  # rep 0 warms up (and compiles the grammar)
        for name, params in (("free", free), ("json", constrained)):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            if rep:
                times[name].append(time.perf_counter() - t0)
            if name == "json":
                texts = [o.text for o in outs]
    tokens = args.batch * args.tokens
    free_s, json_s = (statistics.median(times[k]) for k in ("free", "json"))
    ratio = json_s / free_s
    open_rows = sum(1 for t in texts if not t.rstrip().endswith("]"))
    print(f"batch {args.batch} x {args.tokens} tokens, median of {args.reps}: free "
          f"{tokens / free_s:.0f} tok/s, json schema {tokens / json_s:.0f} tok/s; "
          f"structured/free time {ratio:.3f} (target <= {TARGET_RATIO}); "
          f"{open_rows}/{args.batch} rows still inside the grammar at the end; "
          f"{llm.grammars.compiles} grammar compiled")
    if args.json:
        write_json(args.json, {"batch": args.batch, "tokens": args.tokens, "times": times,
                               "ratio": ratio, "target": TARGET_RATIO,
                               "machine": run_facts(args.threads)})
    return 0
