"""`fastlibra bench replay`: a multi-turn multi-adapter chatbot replayed in real time on
the real engine (`LLM`: Engine + Scheduler + CacheManager(policy) + ModelExecutor), once
per cache policy, with the same device budget.

    build (temp dir, once)   `build_tiny_model`: a random Llama (transformers) + N LoRAs
                             in PEFT's format (ranks 16/8, non-zero A and B), named
                             lora-0 .. lora-{N-1}
    workload                 `make_workload(chatbot)` with short lengths: token-id prompts,
                             Zipf over the adapters, closed-loop sessions
    per policy               a fresh `LLM` (same device / host bytes); wall-clock replay:
                               first turns are added at their arrival time; turn k+1
                               arrives think_s after turn k finished, and its prompt is
                               turn k's prompt + the tokens the model ACTUALLY generated
                               + the workload's new user message (so KV reuse can hit)
                               outputs are scripted by length: greedy, ignore_eos,
                               max_tokens = the workload's answer length
    measured                 TTFT = first-token wall time - arrival wall time (queueing
                             behind a busy step included), TPOT, the cache's hit rates,
                             invalid KV on device after each step, bytes moved by kind

The device budget defaults to the adapters' bytes plus `--conversations` x 256 tokens of
KV: the pool is under pressure, so policies differ in what they keep.
"""

from __future__ import annotations

import copy
import heapq
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from fastlibra.bench.report import run_facts, write_json
from fastlibra.model.tiny import build_tiny_model
from fastlibra.workloads import WorkloadSpec, make_workload, session_spec

BLOCK_SIZE = 16
CONV_TOKENS = 256  # one "conversation" of KV room in the default device budget
TARGET_VS_VLLM = 0.40  # mean TTFT at least 40 % below vllm (the target)


def _status(msg: str) -> None:
    print(f"[bench replay] {msg}", file=sys.stderr, flush=True)


# -- the model on disk -----------------------------------------------------------------
def build_assets(root: Path, args) -> tuple[Path, dict[str, Path]]:
    """`build_tiny_model` with the command's shape: `args.adapters` LoRAs whose ranks
    alternate args.rank_hi / args.rank_lo."""
    return build_tiny_model(
        root, num_adapters=args.adapters, ranks=(args.rank_hi, args.rank_lo), seed=args.seed,
        dtype=getattr(torch, args.dtype),
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads)


def _elem_bytes(args) -> int:
    return torch.finfo(getattr(torch, args.dtype)).bits // 8


def _adapter_bytes(paths: dict[str, Path], args) -> int:
    """The adapters' weights in the engine's dtype (`save_lora` writes float32 files)."""
    files = sum(sum(f.stat().st_size for f in p.glob("*.safetensors")) for p in paths.values())
    return files * _elem_bytes(args) // 4


def _kv_bytes_per_token(args) -> int:
    return args.layers * 2 * args.kv_heads * (args.hidden // args.heads) * _elem_bytes(args)


def default_budget(args, adapters: dict[str, Path]) -> tuple[int, int]:
    """(device, host) bytes: the adapters plus `args.conversations` 256-token contexts of
    KV on the device, so the pool is under pressure; 8x that on the host."""
    device = args.device_memory or (_adapter_bytes(adapters, args)
                                    + args.conversations * CONV_TOKENS * _kv_bytes_per_token(args))
    return device, args.host_memory or 8 * device


# -- the workload ------------------------------------------------------------------------
def workload_spec(args) -> WorkloadSpec:
    return session_spec(args, name="chatbot", num_adapters=args.adapters, max_context=1024)


# -- one policy ----------------------------------------------------------------------------
def replay_policy(policy: str, base: Path, adapters: dict[str, Path], firsts, args,
                  device_memory: int, host_memory: int,
                  log: Callable[[str], None] = _status,
                  step_log: list[dict] | None = None) -> dict:
    """Replay the workload in real time through a fresh LLM; per-request timings, and
    the invalid KV on device after every step. `log` gets a progress line every 10 s.
    `step_log`, if given, gets one record per step (`bench fidelity` fits the simulator's
    step time on it): wall start and end of `LLM.step`, the executor's seconds, the end
    of the loop's work after it, and the batch (prefill chunks, decode contexts,
    distinct adapters)."""
    from fastlibra.llm import LLM
    from fastlibra.model.sampling import SamplingParams

    llm = LLM(base, {k: str(v) for k, v in adapters.items()}, device_memory=device_memory,
              host_memory=host_memory, policy=policy, dtype=args.dtype, device=args.device,
              block_size=BLOCK_SIZE, max_lora_rank=max(args.rank_hi, args.rank_lo))
    llm.generate([5, 6, 7, 8], sampling_params=SamplingParams(temperature=0.0, max_tokens=2,
                                                       ignore_eos=True))  # warm-up, base model
    stats0 = copy.deepcopy(llm.cache.stats)
    if step_log is not None:
        _log_batches(llm, step_log)

    seq = 0
    pending: list = []  # (arrival, seq, turn, prompt)
    for r in firsts:
        heapq.heappush(pending, (r.arrival, seq, r, list(r.prompt)))
        seq += 1
    live: dict[str, tuple] = {}  # rid -> (turn, prompt, arrival)
    first_tok: dict[str, float] = {}
    records: list[dict] = []
    steps = 0
    step_s = 0.0
    invalid_sum = invalid_peak = 0
    t0 = time.perf_counter()
    next_report = 10.0
    while pending or live:
        now = time.perf_counter() - t0
        while pending and pending[0][0] <= now:
            arrival, _, turn, prompt = heapq.heappop(pending)
            n = turn.max_new_tokens
            rid = llm.add_request(prompt, turn.adapter, SamplingParams(
                temperature=0.0, max_tokens=n, ignore_eos=True), request_id=turn.request_id)
            live[rid] = (turn, prompt, arrival)
        if not live:
            time.sleep(max(0.0, min(0.05, pending[0][0] - now)))
            continue
        s0 = time.perf_counter()
        deltas = llm.step()
        t = time.perf_counter()
        steps += 1
        step_s += t - s0
        if step_log is not None and step_log and "end" not in step_log[-1]:
            step_log[-1].update(start=s0 - t0, end=t - t0)
        t -= t0
        invalid = llm.cache.invalid_kv_blocks
        invalid_sum += invalid
        invalid_peak = max(invalid_peak, invalid)
        for d in deltas:
            if d.token_ids and d.request_id not in first_tok:
                first_tok[d.request_id] = t
            if d.finish_reason is None:
                continue
            turn, prompt, arrival = live.pop(d.request_id)
            out = llm.take_output(d.request_id)
            gen = out.token_ids
            ft = first_tok.pop(d.request_id)
            records.append({"id": d.request_id, "adapter": turn.adapter, "arrival": arrival,
                            "prompt_tokens": len(prompt), "cached_tokens": out.cached_tokens,
                            "output_tokens": len(gen), "ttft": ft - arrival,
                            "tpot": (t - ft) / (len(gen) - 1) if len(gen) > 1 else None,
                            "finish_reason": out.finish_reason})
            nxt = turn.next_turn
            if nxt is not None:
                # the workload's next prompt = prompt + scripted answer + new message;
                # ours = prompt + what the model really generated + the same new message
                user = nxt.prompt[len(turn.prompt) + len(turn.output or []):]
                heapq.heappush(pending, (t + turn.think_s, seq, nxt, prompt + gen + user))
                seq += 1
        if step_log is not None and step_log and "loop_end" not in step_log[-1]:
            step_log[-1]["loop_end"] = time.perf_counter() - t0
        if t >= next_report:
            log(f"  {policy}: t={t:.0f} s, {len(records)} done, {len(live)} running, "
                f"{len(pending)} pending")
            next_report += 10.0
    wall = time.perf_counter() - t0
    st = llm.cache.stats
    prompt = st.prompt_tokens - stats0.prompt_tokens
    dev = st.device_hit_tokens - stats0.device_hit_tokens
    host = st.host_hit_tokens - stats0.host_hit_tokens
    ttft = sorted(r["ttft"] for r in records)
    tpot = [r["tpot"] for r in records if r["tpot"] is not None]
    return {
        "policy": policy, "requests": len(records), "wall_s": wall, "steps": steps,
        "mean_step_ms": 1e3 * step_s / max(1, steps),
        "ttft_mean_ms": 1e3 * statistics.fmean(ttft),
        "ttft_p50_ms": 1e3 * _pct(ttft, 50), "ttft_p99_ms": 1e3 * _pct(ttft, 99),
        "tpot_mean_ms": 1e3 * statistics.fmean(tpot) if tpot else float("nan"),
        "prompt_tokens": prompt,
        "device_hit_rate": dev / prompt if prompt else 0.0,
        "host_hit_rate": host / prompt if prompt else 0.0,
        "adapter_device_hits": st.adapter_device_hits - stats0.adapter_device_hits,
        "adapter_host_hits": st.adapter_host_hits - stats0.adapter_host_hits,
        "adapter_disk_loads": st.adapter_disk_loads - stats0.adapter_disk_loads,
        "swap_ins": st.swap_ins - stats0.swap_ins, "swap_outs": st.swap_outs - stats0.swap_outs,
        "drops": st.drops - stats0.drops,
        "invalid_kv_blocks_mean": invalid_sum / max(1, steps),
        "invalid_kv_blocks_peak": invalid_peak,
        "bytes_moved": {k: v - stats0.bytes_moved[k] for k, v in st.bytes_moved.items()},
        "hardware": {k: v for k, v in asdict(llm.cache.cost.hw).items() if k != "name"},
        "requests_detail": records,
    }


def mean_of_replays(runs: list[dict]) -> dict:
    """Several replays of one policy as one: the mean of every number (percentiles are
    means of the per-replay percentiles), the requests of all of them in order, and each
    replay's mean TTFT. On this shared box one replay of vllm moves by 20 % run to run (its
    queueing for a slot turns on sub-millisecond timing), so one draw says little."""
    out: dict = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs]
        if isinstance(first, dict):
            out[key] = {k: statistics.fmean(v[k] for v in values) for k in first}
        elif isinstance(first, (int, float)) and not isinstance(first, bool) \
                and any(v != first for v in values):
            out[key] = statistics.fmean(values)
        else:
            out[key] = first
    out["requests_detail"] = [x for r in runs for x in r["requests_detail"]]
    out["ttft_mean_ms_per_replay"] = [r["ttft_mean_ms"] for r in runs]
    return out


def _log_batches(llm, step_log: list[dict]) -> None:
    """Wrap the executor so every step's batch and measured seconds land in `step_log`."""
    inner = llm.executor.execute

    def execute(batch, now):
        out = inner(batch, now)
        step_log.append({
            "prefills": [(p.num_tokens, p.prefix_len) for p in batch.prefills],
            "decode_ctx": [r.num_computed for r in batch.decodes],
            "adapters": len({r.adapter for r in [p.request for p in batch.prefills]
                             + batch.decodes if r.adapter}),
            "exec_s": out.duration})
        return out

    llm.executor.execute = execute


def _pct(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


# -- the benchmark -----------------------------------------------------------------------
def _table(results: dict[str, dict]) -> str:
    rows = [f"{'policy':<10} {'reqs':>5} {'TTFT mean':>10} {'p50':>8} {'p99':>9} "
            f"{'TPOT':>7} {'dev hit':>8} {'host hit':>9} {'ad.disk':>8} {'step':>7}"]
    for p, r in results.items():
        rows.append(f"{p:<10} {r['requests']:>5} {r['ttft_mean_ms']:>8.1f}ms "
                    f"{r['ttft_p50_ms']:>6.1f}ms {r['ttft_p99_ms']:>7.1f}ms "
                    f"{r['tpot_mean_ms']:>5.1f}ms {r['device_hit_rate']:>8.1%} "
                    f"{r['host_hit_rate']:>9.1%} {r['adapter_disk_loads']:>8} "
                    f"{r['mean_step_ms']:>5.1f}ms")
    return "\n".join(rows)


def _reductions(results: dict[str, dict]) -> dict[str, float]:
    if "fastlibra" not in results:
        return {}
    ours = results["fastlibra"]["ttft_mean_ms"]
    return {p: 1.0 - ours / r["ttft_mean_ms"] for p, r in results.items() if p != "fastlibra"}


def run_replay(args) -> int:

    torch.set_num_threads(args.threads)
    spec = workload_spec(args)
    firsts = make_workload(spec)
    from fastlibra.workloads import iter_turns
    turns = list(iter_turns(firsts))
    if not turns:
        raise ValueError("the workload is empty; raise --rate or --duration")
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
             "kv_heads": args.kv_heads, "intermediate": args.intermediate, "vocab": args.vocab,
             "dtype": args.dtype, "device": args.device, "adapters": args.adapters,
             "adapter_ranks": [args.rank_hi if i % 2 == 0 else args.rank_lo
                               for i in range(args.adapters)]}
    _status(f"torch {torch.__version__}, {args.threads} thread(s); model {shape}")
    _status(f"workload: {len(firsts)} sessions, {len(turns)} turns over {args.duration:.0f} s "
            f"of arrivals (rate {args.rate}/s, think {args.think} s)")
    with tempfile.TemporaryDirectory(prefix="fastlibra-bench-replay-") as tmp:
        t = time.perf_counter()
        base, adapters = build_assets(Path(tmp), args)
        kv_tok = _kv_bytes_per_token(args)
        ad_bytes = _adapter_bytes(adapters, args)
        device, host = default_budget(args, adapters)
        _status(f"built the model and {args.adapters} adapters in "
                f"{time.perf_counter() - t:.1f} s; adapters {ad_bytes / 2**20:.2f} MiB, KV "
                f"{kv_tok} B/token; device budget {device / 2**20:.2f} MiB "
                f"({device // (BLOCK_SIZE * kv_tok)} blocks), host {host / 2**20:.2f} MiB")
        if args.rates:
            return _rate_sweep(args, base, adapters, device, host)
        runs: dict[str, list[dict]] = {p: [] for p in args.policy}
        for rep in range(args.repeats):  # policies interleaved, so drift hits all alike
            for policy in args.policy:
                _status(f"replaying through {policy} ({rep + 1}/{args.repeats}; real time, "
                        f"~{args.duration:.0f} s + tail)")
                r = replay_policy(policy, base, adapters, [x.fresh_copy() for x in firsts],
                                  args, device, host)
                runs[policy].append(r)
                _status(f"  {policy}: {r['requests']} requests in {r['wall_s']:.1f} s, mean "
                        f"TTFT {r['ttft_mean_ms']:.1f} ms, device hit "
                        f"{r['device_hit_rate']:.1%}")
        results = {p: mean_of_replays(rs) for p, rs in runs.items()}
    red = _reductions(results)
    out = {
        "machine": run_facts(args.threads),
        "model": shape,
        "workload": {"generator": "chatbot", "sessions": len(firsts), "turns": len(turns),
                     "rate": args.rate, "duration_s": args.duration, "think_mean_s": args.think,
                     "zipf": args.zipf, "system_len": args.system_len,
                     "user_len": args.user_len, "answer_len": args.answer_len,
                     "mean_turns": args.mean_turns, "seed": args.seed},
        "budget": {"device_bytes": device, "host_bytes": host, "adapter_bytes": ad_bytes,
                   "kv_bytes_per_token": kv_tok, "block_size": BLOCK_SIZE,
                   "device_blocks": device // (BLOCK_SIZE * kv_tok)},
        "policies": {p: {k: v for k, v in r.items() if k != "requests_detail"}
                     for p, r in results.items()},
        "ttft_reduction_vs": red,
    }
    if "vllm" in red:
        out["target"] = {"ttft_reduction_vs_vllm": red["vllm"], "target": TARGET_VS_VLLM,
                         "met": red["vllm"] >= TARGET_VS_VLLM}
    print(_table(results))
    for p, x in red.items():
        print(f"fastlibra mean TTFT vs {p}: {x:+.1%} lower"
              + (f" (target >= {TARGET_VS_VLLM:.0%}: {'met' if x >= TARGET_VS_VLLM else 'NOT met'})"
                 if p == "vllm" else ""))
    if args.json:
        out["requests"] = {p: r["requests_detail"] for p, r in results.items()}
        write_json(args.json, out, _status)
    return 0


def _rate_sweep(args, base: Path, adapters: dict[str, Path], device: int, host: int) -> int:
    """Every policy at every rate (policies interleaved per rate, so drift of a shared
    machine hits all alike); peak load as `bench paper` computes it."""
    from fastlibra.bench.paper import THRESHOLD_S, peak_load

    ttft: dict[str, dict[float, float]] = {p: {} for p in args.policy}
    for rate in sorted(args.rates):
        at_rate = copy.copy(args)
        at_rate.rate = rate
        firsts = make_workload(workload_spec(at_rate))
        for policy in args.policy:
            _status(f"rate {rate:g}/s: replaying through {policy} (real time)")
            r = replay_policy(policy, base, adapters, [x.fresh_copy() for x in firsts], args,
                              device, host)
            ttft[policy][rate] = r["ttft_mean_ms"] / 1e3
    peaks = {p: peak_load(list(v), list(v.values()), THRESHOLD_S) for p, v in ttft.items()}
    print(f"{'policy':<12}" + "".join(f"{r:>9g}/s" for r in sorted(args.rates))
          + f"{'peak load':>12}")
    for p, by_rate in ttft.items():
        rate, censored = peaks[p]
        mark = {"above": ">=", "below": "<", None: ""}[censored]
        print(f"{p:<12}" + "".join(f"{1e3 * t:>9.0f}ms" for t in by_rate.values())
              + f"{mark:>6}{rate:>6.2f}/s")
    print(f"mean TTFT per session rate; peak load = highest rate with mean TTFT < "
          f"{THRESHOLD_S * 1e3:.0f} ms (interpolated; >= / < = beyond the measured rates)")
    if "fastlibra" in peaks:
        for p, (rate, _) in peaks.items():
            if p != "fastlibra":
                print(f"fastlibra peak load / {p}: {peaks['fastlibra'][0] / rate:.2f}x")
    if args.json:
        write_json(args.json, {
            "machine": run_facts(args.threads), "rates": sorted(args.rates),
            "budget": {"device_bytes": device, "host_bytes": host},
            "ttft_mean_s": {p: {str(r): t for r, t in v.items()} for p, v in ttft.items()},
            "peak_load": {p: {"rate": r, "censored": c} for p, (r, c) in peaks.items()}},
            _status)
    return 0
