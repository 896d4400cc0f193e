"""`fastlibra bench mechanisms`: does each cost-model mechanism pay on data it was not tuned on?

The leaf floor, ghosts, the disk-wait ratio and the adapters' own half-life were each
justified on one traced cell (70B translation, seed 0). This runs `fastlibra` against
`fastlibra~M` (the same policy with mechanism M off, `cache/cost.py` MECHANISMS) on
held-out data: the paper's quick pair (Llama-2 7B on one A100), a host of `--host-ratio` times
the device budget (default 2: the ranking decides only once the host must drop), the four generated workloads
at seeds 1, 2 and 3 (every tuning run used seed 0), and the first requests of the public
Mooncake conversation trace with adapters drawn per session (Zipf 1.0). It prints, per
mechanism, the mean TTFT change when it is switched off (positive = the mechanism pays)
per cell and over all cells.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastlibra.bench.paper import Pair
from fastlibra.bench.report import run_facts, write_json
from fastlibra.cache.cost import MECHANISMS

PAIR = Pair("llama-2-7b", "a100-80g", 1, 32)
SEEDS = (1, 2, 3)
RATES = {"chatbot": 14.0, "drift": 14.0, "translation": 22.0, "agent": 1.6}
"""Requests/s near fastlibra's knee on this pair at 100 adapters (the middle rate `bench
paper --quick` calibrates); below it nothing is evicted, above it queueing dominates."""
ADAPTERS = 100
MOONCAKE = Path(__file__).resolve().parents[3] / "shared/traces/mooncake-fast25/conversation_trace.jsonl"
MOONCAKE_REQUESTS = 600
MOONCAKE_TIME_SCALE = 4.0
"""Its first 600 requests (about 7 minutes, 12k-token prompts) stretched 4x: at their own
pace they queue for minutes on one A100 with this budget, and queueing hides every
caching decision."""


@dataclass(frozen=True)
class Cell:
    name: str
    workload: str
    """A generator, or `trace:PATH`."""
    rate: float
    seed: int


def cells(duration: float, trace: Path | None) -> list[Cell]:
    out = [Cell(f"{w}/s{s}", w, r, s) for w in RATES for r in [RATES[w]] for s in SEEDS]
    if trace is not None:
        out.append(Cell("mooncake", f"trace:{trace}", 0.0, 0))
    return out


def _run(cell: Cell, policy: str, duration: float, host_ratio: float) -> dict:
    from fastlibra.bench.simulate import build_requests
    from fastlibra.sim.simulate import SimSetup, simulate

    reqs = build_requests(cell.workload, cell.rate, ADAPTERS, 1.0, duration, cell.seed)
    setup = SimSetup(PAIR.profile(), device_memory=PAIR.budget_bytes(),
                     host_memory=PAIR.host_bytes(host_ratio))
    res = simulate(policy, reqs, setup)
    return {"ttft_mean": res["ttft_mean"], "ttft_p99": res["ttft_p99"],
            "completed": res["completed"]}


def _convert_mooncake(dst: Path) -> Path | None:
    from fastlibra.traces import convert_mooncake

    if not MOONCAKE.is_file():
        print(f"note: {MOONCAKE} not found; the trace cell is left out")
        return None
    convert_mooncake(MOONCAKE, dst, num_adapters=ADAPTERS, zipf=1.0, seed=1,
                     max_requests=MOONCAKE_REQUESTS, time_scale=MOONCAKE_TIME_SCALE)
    return dst


def run_mechanisms(args) -> int:
    t0 = time.perf_counter()
    policies = ["fastlibra"] + [f"fastlibra~{m}" for m in MECHANISMS]
    with tempfile.TemporaryDirectory() as tmp:
        trace = None if args.no_trace else _convert_mooncake(Path(tmp) / "mooncake.jsonl")
        grid = cells(args.duration, trace)
        print(f"bench mechanisms: {PAIR.model}@{PAIR.hardware}, {ADAPTERS} adapters, host "
              f"{args.host_ratio:g}x device budget, {len(grid)} held-out cells x {len(policies)} "
              f"policies ({args.jobs} workers)", flush=True)
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = {(c.name, p): pool.submit(_run, c, p, args.duration, args.host_ratio)
                       for c in grid for p in policies}
            results = {key: f.result() for key, f in futures.items()}
    rows = {}
    print(f"\n{'mechanism off':<32} {'mean TTFT':>10} {'P99':>8} {'pays in':>8}")
    for p in policies[1:]:
        deltas = [results[(c.name, p)]["ttft_mean"] / results[(c.name, "fastlibra")]["ttft_mean"] - 1
                  for c in grid]
        p99 = [results[(c.name, p)]["ttft_p99"] / results[(c.name, "fastlibra")]["ttft_p99"] - 1
               for c in grid]
        rows[p] = {"mean_ttft_change": statistics.fmean(deltas),
                   "p99_ttft_change": statistics.fmean(p99),
                   "cells_where_it_pays": sum(d > 0.01 for d in deltas),
                   "cells_where_it_costs": sum(d < -0.01 for d in deltas),
                   "per_cell": dict(zip((c.name for c in grid), deltas, strict=True))}
        print(f"{p:<32} {rows[p]['mean_ttft_change']:>+10.1%} "
              f"{rows[p]['p99_ttft_change']:>+8.1%} "
              f"{rows[p]['cells_where_it_pays']:>3}/{len(grid):<4}")
    print("change = TTFT with the mechanism off / with it on - 1, mean over cells "
          "(positive: the mechanism pays); 'pays in' = cells where switching it off costs "
          "more than 1 %")
    print("\nper cell, fastlibra mean TTFT (ms): " + ", ".join(
        f"{c.name} {1e3 * results[(c.name, 'fastlibra')]['ttft_mean']:.0f}" for c in grid))
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        write_json(args.json, {
            "machine": run_facts(), "pair": PAIR.__dict__, "host_ratio": args.host_ratio,
            "adapters": ADAPTERS, "duration_s": args.duration, "rates": RATES,
            "seeds": SEEDS, "cells": [c.__dict__ for c in grid], "mechanisms": rows,
            "results": {f"{c}|{p}": r for (c, p), r in results.items()}})
    return 0
