"""`fastlibra bench paper`: the paper's evaluation grid on the simulator.

    cells = model/GPU pairs x workloads x adapter counts x request rates
    runs  = per cell: fastlibra, vllm, vllm-offload, slora, sglang, sglang-hicache,
            fastlibra-nodep, fastlibra-lru, fastlibra-paper and its four ablations (one
            Eval term off each),
            vllm-oracle (vllm's static adapter share swept) and the lower bound
            (fastlibra with unlimited device memory)

Every run is one `simulate()` call on its own (same requests, same scheduler, same
step-time model, same device budget within a cell); they run in a process pool.

Choices (each one is also written into the JSON `config`):

* **Pairs.** Full: (llama-3-8b, h800-80g, tp 1, rank 32), (codellama-34b, h800-80g, tp 4,
  rank 64), (llama-3-70b, h800-80g, tp 8, rank 64), as the paper ran (8 x H800; Llama2-34B
  is CodeLlama-34B's shape). `--quick`: (llama-2-7b, a100-80g, tp 1, rank 32).
* **Device budget** (the same for every policy of a pair): room for `BUDGET_TOKENS`
  (32,768) tokens of KV plus `BUDGET_ADAPTERS` (20) adapters. The pool thus holds the
  smallest adapter set (20) but not its KV, and a few dozen conversations: the working set
  of every workload exceeds it. Each cell reports the working set as the peak device
  footprint of the lower-bound run (unlimited memory, nothing ever evicted) and its ratio
  to the budget. Host memory is 256 GiB, or `--host-ratio R` times the device budget: the
  cost model and the dependency rule only decide anything once the host tier fills.
* **Rates.** Per (pair, workload), shared by its adapter counts, found automatically by
  a calibration on the sweep's own workload: the saturation rate `sat(policy, N)`
  (mean TTFT crosses 500 ms) is found by doubling from 0.5 req/s (halving if 0.5 already
  saturates), then two geometric bisection steps and a linear interpolation. The ladder
  is `num_rates` rates, geometric from `lo = min(0.6 x sat(vllm, max N), hi / 3)` to
  `hi = 1.25 x sat(fastlibra, min N)`, two significant digits: the bottom is below
  vLLM's knee in the hardest cell, the top past FastLibra's knee in the easiest one (and
  so past vLLM's, which the run checks and reports). `--rates` overrides it.
* **vllm-oracle.** vllm with the static adapter share in {0.05, 0.10, ..., 0.95} that gives
  the lowest mean TTFT in that cell; runs with rejected requests do not qualify. The sweep
  goes up from 0.05 and stops once 3 consecutive shares past the best have not beaten it
  (the plain `vllm` run is reused as the 0.20 point).
* **Peak load** per (pair, workload, adapters) and policy: the highest rate with mean
  TTFT < 500 ms, interpolated linearly between the two measured rates around the first
  crossing of 500 ms. If every rate stays below, the peak is censored at the top rate
  (">="); if the lowest rate already crosses, it is censored below ("<"). Peak-load gains
  are averaged over the groups where neither policy's peak is censored.
* **Reductions** of fastlibra against policy X: per cell `1 - fastlibra / X` (mean TTFT,
  P99 TTFT, TPOT), then the mean over cells; and the ratio of means,
  `1 - mean_cells(fastlibra) / mean_cells(X)`. The lower-bound gap is
  `fastlibra / lower-bound - 1` likewise.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

THRESHOLD_S = 0.5
BUDGET_TOKENS = 32768
BUDGET_ADAPTERS = 20
SHARES = tuple(round(0.05 * k, 2) for k in range(1, 20))
ORACLE_PATIENCE = 3
BETTER_MARGIN = 0.01
"""A cell counts as another policy beating fastlibra when its mean TTFT is lower by more."""
ORACLE_FIRST_BATCH = 3
"""Shares 0.05..0.15 run alongside the cell's policies; later ones one at a time."""
FASTLIBRA = "fastlibra"
ORACLE = "vllm-oracle"
LOWER_BOUND = "lower-bound"
PAPER = "fastlibra-paper"
PAPER_ABLATIONS = tuple(f"{PAPER}-no-{t}" for t in ("lora", "transfer", "visit", "recency"))
PAPER_ABLATION_TTFT = {f"{PAPER}-no-lora": 1.21, f"{PAPER}-no-transfer": 1.19,
                       f"{PAPER}-no-visit": 1.25, f"{PAPER}-no-recency": 1.21}
"""The paper's own ablation table: mean TTFT without each Eval term / with all of them."""
RUN_POLICIES = ("fastlibra", "vllm", "vllm-offload", "slora", "sglang", "sglang-hicache",
                "fastlibra-nodep", "fastlibra-lru", PAPER, *PAPER_ABLATIONS)
ALL_POLICIES = RUN_POLICIES + (ORACLE, LOWER_BOUND)
OTHERS = ("vllm", "vllm-offload", "slora", "sglang", "sglang-hicache", ORACLE,
          "fastlibra-nodep", "fastlibra-lru", PAPER)
WORKLOADS = ("chatbot", "translation", "agent")
ADAPTERS_FULL = (20, 50, 100, 200)
ADAPTERS_QUICK = (20, 100)
CAL_START = 0.5
CAL_MAX = 4096.0
CAL_MIN = CAL_START / 16
"""Halving stops here: below it the unloaded TTFT itself is over the threshold."""
CAL_BISECT = 2
LADDER_LO = 0.6
LADDER_HI = 1.25
HOST_DEFAULT = 256 * 2**30
MARKER_START = "<!-- paper-sweep:start -->"
MARKER_END = "<!-- paper-sweep:end -->"


@dataclass(frozen=True)
class Pair:
    model: str
    hardware: str
    tp: int
    rank: int

    @functools.cached_property
    def label(self) -> str:
        """model@{tp}xGPU by the profile's names: a model directory or a hardware file
        goes by its own name, not its path."""
        p = self.profile()
        return f"{p.model.name}@{self.tp}x{p.gpu.name}"

    def profile(self):
        from fastlibra.bench.simulate import named_profile
        return named_profile(self.model, self.hardware, self.tp, self.rank)

    def budget_bytes(self) -> int:
        p = self.profile()
        return BUDGET_TOKENS * p.model.kv_bytes_per_token + BUDGET_ADAPTERS * p.lora.nbytes(p.model)

    def host_bytes(self, host_ratio: float | None) -> int:
        """Host pool: `host_ratio` x the device budget, or HOST_DEFAULT when None."""
        return HOST_DEFAULT if host_ratio is None else int(host_ratio * self.budget_bytes())


PAIRS_FULL = (Pair("llama-3-8b", "h800-80g", 1, 32), Pair("codellama-34b", "h800-80g", 4, 64),
              Pair("llama-3-70b", "h800-80g", 8, 64))
PAIRS_QUICK = (Pair("llama-2-7b", "a100-80g", 1, 32),)


@dataclass(frozen=True)
class Task:
    """One simulate() call; `device_memory` None = unlimited (the lower bound)."""

    pair: Pair
    workload: str
    adapters: int
    rate: float
    duration: float
    seed: int
    policy: str
    device_memory: int | None
    adapter_share: float | None = None
    host_memory: int = HOST_DEFAULT


# -- worker side ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _requests(workload: str, rate: float, adapters: int, duration: float, seed: int):
    from fastlibra.bench.simulate import build_requests
    return build_requests(workload, rate, adapters, 1.0, duration, seed)


def run_task(task: Task) -> dict:
    """Run one simulation; the summary without per-request lists, plus its footprint."""
    from fastlibra.engine.metrics import COMPOSITION_KINDS
    from fastlibra.sim.simulate import SimSetup, count_requests, simulate, with_unlimited_memory

    t0 = time.perf_counter()
    profile = task.pair.profile()
    reqs = _requests(task.workload, task.rate, task.adapters, task.duration, task.seed)
    setup = SimSetup(profile, device_memory=task.device_memory, host_memory=task.host_memory,
                     adapter_share=task.adapter_share)
    if task.device_memory is None:
        setup = with_unlimited_memory(setup)
    res = simulate(task.policy, reqs, setup)
    tl = res.pop("timeline")
    res.pop("ttfts", None)
    used = [sum(tl[k][i] for k in COMPOSITION_KINDS if k != "free") for i in range(len(tl["t"]))]
    block_bytes = setup.block_size * profile.model.kv_bytes_per_token
    res["peak_footprint_gib"] = max(used, default=0) * block_bytes / 2**30
    res["requests"] = count_requests(reqs)
    res["wall_s"] = time.perf_counter() - t0
    return res


# -- driver: generators that yield batches of tasks ------------------------------------------

Job = Generator[list[Task], list[dict], object]


def drive(jobs: dict[object, Job], workers: int, bar: tqdm | None = None,
          runner: Callable[[Task], dict] = run_task) -> dict[object, object]:
    """Run every job to completion; a job yields a list of tasks and is sent their results
    (in order) once all of them are done; its return value is its result."""
    out: dict[object, object] = {}

    def note(n_new: int = 0, n_done: int = 0) -> None:
        if bar is not None:
            bar.total += n_new
            bar.update(n_done)
            if n_new:
                bar.refresh()

    if workers <= 1:
        for key, job in jobs.items():
            try:
                tasks = next(job)
                while True:
                    note(n_new=len(tasks))
                    results = []
                    for t in tasks:
                        results.append(runner(t))
                        note(n_done=1)
                    tasks = job.send(results)
            except StopIteration as stop:
                out[key] = stop.value
        return out

    ctx = multiprocessing.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: dict[Future, tuple[object, int]] = {}
        batches: dict[object, list] = {}

        def advance(key, send) -> None:
            job = jobs[key]
            try:
                tasks = next(job) if send is None else job.send(send)
            except StopIteration as stop:
                out[key] = stop.value
                return
            note(n_new=len(tasks))
            batches[key] = [None] * len(tasks)
            if not tasks:
                advance(key, [])
                return
            for i, t in enumerate(tasks):
                pending[pool.submit(runner, t)] = (key, i)

        for key in jobs:
            advance(key, None)
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                key, i = pending.pop(fut)
                batches[key][i] = fut.result()
                note(n_done=1)
                if all(r is not None for r in batches[key]):
                    advance(key, batches.pop(key))
    return out


# -- calibration: where does a policy saturate? ----------------------------------------------

def saturation_job(pair: Pair, workload: str, adapters: int, policy: str, duration: float,
                   seed: int, host_ratio: float | None = None) -> Job:
    """Rate (req/s) at which `policy`'s mean TTFT crosses THRESHOLD_S (doubling, halving,
    then geometric bisection and a final linear interpolation)."""
    budget = pair.budget_bytes()

    def task(rate: float) -> list[Task]:
        return [Task(pair, workload, adapters, rate, duration, seed, policy, budget,
                     host_memory=pair.host_bytes(host_ratio))]

    def over(res: dict) -> bool:  # no request finished (nan) = not loaded
        t = res["ttft_mean"]
        return t is not None and math.isfinite(t) and t >= THRESHOLD_S

    def ttft(res: dict) -> float:
        t = res["ttft_mean"]
        return t if t is not None and math.isfinite(t) else 0.0

    rate = CAL_START
    (res,) = yield task(rate)
    below: tuple[float, float] | None = None
    above: tuple[float, float] | None = None
    if not over(res):
        below = (rate, ttft(res))
        while rate < CAL_MAX:
            rate *= 2
            (res,) = yield task(rate)
            if over(res):
                above = (rate, ttft(res))
                break
            below = (rate, ttft(res))
        if above is None:
            return rate
    else:
        above = (rate, ttft(res))
        while rate > CAL_MIN:
            rate /= 2
            (res,) = yield task(rate)
            if not over(res):
                below = (rate, ttft(res))
                break
            above = (rate, ttft(res))
        if below is None:
            return rate
    for _ in range(CAL_BISECT):
        mid = math.sqrt(below[0] * above[0])
        (res,) = yield task(mid)
        if over(res):
            above = (mid, ttft(res))
        else:
            below = (mid, ttft(res))
    (r0, t0), (r1, t1) = below, above
    return r0 + (THRESHOLD_S - t0) * (r1 - r0) / (t1 - t0) if t1 > t0 else r0


def _round2(x: float) -> float:
    return float(f"{x:.2g}")


def rate_ladder(sat_vllm_hard: float, sat_fastlibra_easy: float, n: int) -> list[float]:
    """`n` increasing rates, geometric from below vLLM's knee to past FastLibra's."""
    hi = LADDER_HI * max(sat_vllm_hard, sat_fastlibra_easy)
    lo = min(LADDER_LO * sat_vllm_hard, hi / 3)
    if n == 1:
        return [_round2(hi)]
    rates = [_round2(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]
    out: list[float] = []
    for r in rates:  # rounding may collide on narrow ladders: keep them strictly increasing
        if out and r <= out[-1]:
            r = float(f"{out[-1] * 1.1:.3g}")
        out.append(r)
    return out


# -- one cell ---------------------------------------------------------------------------------

def _oracle_key(res: dict) -> float:
    t = res["ttft_mean"]
    return math.inf if res.get("rejected", 0) or t is None or math.isnan(t) else t


def oracle_done(sweep: dict[float, dict]) -> bool:
    """Stop once ORACLE_PATIENCE consecutive shares past the best have not beaten it."""
    shares = sorted(sweep)
    best = min(shares, key=lambda s: (_oracle_key(sweep[s]), s))
    return len([s for s in shares if s > best]) >= ORACLE_PATIENCE


def cell_job(pair: Pair, workload: str, adapters: int, rate: float, duration: float,
             seed: int, host_ratio: float | None = None) -> Job:
    from fastlibra.cache.policies import get_policy

    budget = pair.budget_bytes()

    def task(policy: str, memory: int | None = budget, share: float | None = None) -> Task:
        return Task(pair, workload, adapters, rate, duration, seed, policy, memory, share,
                    pair.host_bytes(host_ratio))

    vllm_share = get_policy("vllm").adapter_share
    first = [task(p) for p in RUN_POLICIES] + [task(FASTLIBRA, None)]
    first += [task("vllm", share=s) for s in SHARES[:ORACLE_FIRST_BATCH]]
    results = yield first
    runs = dict(zip(RUN_POLICIES, results, strict=False))
    runs[LOWER_BOUND] = results[len(RUN_POLICIES)]
    sweep = dict(zip(SHARES[:ORACLE_FIRST_BATCH], results[len(RUN_POLICIES) + 1:], strict=True))
    if vllm_share in SHARES:
        sweep[vllm_share] = runs["vllm"]
    for s in SHARES:
        if oracle_done(sweep):
            break
        if s in sweep:
            continue
        (sweep[s],) = yield [task("vllm", share=s)]
    best = min(sorted(sweep), key=lambda s: (_oracle_key(sweep[s]), s))
    runs[ORACLE] = dict(sweep[best], adapter_share=best)
    lb = runs[LOWER_BOUND]
    return {
        "pair": pair.label, "model": pair.model, "hardware": pair.hardware, "tp": pair.tp,
        "adapter_rank": pair.rank, "workload": workload, "adapters": adapters, "rate": rate,
        "duration_s": duration, "seed": seed, "requests": lb["requests"],
        "budget_gib": budget / 2**30, "working_set_gib": lb["peak_footprint_gib"],
        "working_set_over_budget": lb["peak_footprint_gib"] * 2**30 / budget,
        "oracle": {"share": best, "sweep": {f"{s:.2f}": sweep[s]["ttft_mean"]
                                            for s in sorted(sweep)}},
        "policies": {p: runs[p] for p in ALL_POLICIES},
    }


# -- summary ----------------------------------------------------------------------------------

def _finite(xs: Iterable[float]) -> list[float]:
    return [x for x in xs if x is not None and math.isfinite(x)]


def _mean(xs: Iterable[float]) -> float | None:
    xs = _finite(xs)
    return float(np.mean(xs)) if xs else None


def reduction(ours: float, other: float) -> float | None:
    """1 - ours / other (positive = ours is lower, i.e. better for a latency)."""
    if other is None or ours is None or not (math.isfinite(other) and math.isfinite(ours)) \
            or other <= 0:
        return None
    return 1 - ours / other


def peak_load(rates: list[float], ttfts: list[float],
              threshold: float = THRESHOLD_S) -> tuple[float, str | None]:
    """Highest rate with mean TTFT < threshold, linear between the two measured rates around
    the first crossing. Returns (rate, censored): censored "above" = never crossed (peak >=
    the top rate), "below" = the lowest rate already crossed (peak < the lowest rate)."""
    pts = sorted(zip(rates, ttfts, strict=True))
    if not pts:
        raise ValueError("peak_load needs at least one measured rate")
    t_first = pts[0][1]
    if t_first is None or not math.isfinite(t_first) or t_first >= threshold:
        return pts[0][0], "below"
    for (r0, t0), (r1, t1) in zip(pts, pts[1:], strict=False):
        if t1 is None or not math.isfinite(t1) or t1 >= threshold:
            if t1 is None or not math.isfinite(t1):
                return r0, None
            return r0 + (threshold - t0) * (r1 - r0) / (t1 - t0), None
    return pts[-1][0], "above"


def _reductions(cells: list[dict], other: str) -> dict:
    out: dict = {}
    for key, label in (("ttft_mean", "mean_ttft"), ("ttft_p99", "p99_ttft"),
                       ("tpot_mean", "tpot")):
        ours = [c["policies"][FASTLIBRA][key] for c in cells]
        theirs = [c["policies"][other][key] for c in cells]
        out[f"{label}_reduction"] = _mean(reduction(a, b) for a, b in zip(ours, theirs,
                                                                           strict=True))
        mo, mt = _mean(ours), _mean(theirs)
        out[f"{label}_reduction_of_means"] = reduction(mo, mt)
    ratios = [c["policies"][other]["ttft_mean"] / c["policies"][FASTLIBRA]["ttft_mean"]
              for c in cells if c["policies"][FASTLIBRA]["ttft_mean"]]
    out["ttft_ratio_mean"] = _mean(ratios)
    out["ttft_ratio_geomean"] = float(np.exp(np.mean(np.log(_finite(ratios))))) \
        if _finite(ratios) else None
    out["cells_where_better_than_fastlibra"] = [
        {"cell": cell_id(c), "fastlibra_ms": c["policies"][FASTLIBRA]["ttft_mean"] * 1e3,
         f"{other}_ms": c["policies"][other]["ttft_mean"] * 1e3}
        for c in cells
        if c["policies"][other]["ttft_mean"] < (1 - BETTER_MARGIN) * c["policies"][FASTLIBRA]["ttft_mean"]]
    out["cells"] = len(cells)
    return out


def cell_id(c: dict) -> str:
    return f"{c['pair']}/{c['workload']}/{c['adapters']}/{c['rate']:g}"


def group_key(c: dict) -> str:
    return f"{c['pair']}/{c['workload']}/{c['adapters']}"


def peak_loads(cells: list[dict]) -> dict[str, dict[str, dict]]:
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(group_key(c), []).append(c)
    out: dict[str, dict[str, dict]] = {}
    for g, cs in groups.items():
        cs = sorted(cs, key=lambda c: c["rate"])
        out[g] = {}
        for p in ALL_POLICIES:
            rate, censored = peak_load([c["rate"] for c in cs],
                                       [c["policies"][p]["ttft_mean"] for c in cs])
            out[g][p] = {"rate": rate, "censored": censored}
    return out


def paper_ablations(cells: list[dict]) -> dict[str, dict]:
    """Each Eval term's share, as the paper reports it: mean TTFT of fastlibra-paper
    without the term over fastlibra-paper's (geometric mean over cells, and of means)."""
    out = {}
    full = [c["policies"][PAPER]["ttft_mean"] for c in cells]
    for p in PAPER_ABLATIONS:
        ablated = [c["policies"][p]["ttft_mean"] for c in cells]
        ratios = _finite(a / f for a, f in zip(ablated, full, strict=True) if a and f)
        mean_full, mean_ablated = _mean(full), _mean(ablated)
        out[p] = {"ttft_ratio_geomean": float(np.exp(np.mean(np.log(ratios))))
                  if ratios else None,
                  "ttft_ratio_of_means": mean_ablated / mean_full
                  if mean_full and mean_ablated is not None else None,
                  "paper": PAPER_ABLATION_TTFT[p]}
    return out


def summarize(cells: list[dict]) -> dict:
    peaks = peak_loads(cells)
    vs = {o: _reductions(cells, o) for o in OTHERS}
    for o in OTHERS:
        gains, bounded = [], []
        for g in peaks.values():
            ours, theirs = g[FASTLIBRA], g[o]
            if theirs["rate"] > 0:
                bounded.append(ours["rate"] / theirs["rate"] - 1)
                if ours["censored"] is None and theirs["censored"] is None:
                    gains.append(ours["rate"] / theirs["rate"] - 1)
        vs[o]["peak_load_gain"] = _mean(gains)
        vs[o]["peak_load_gain_groups"] = len(gains)
        vs[o]["peak_load_gain_with_censored"] = _mean(bounded)
    gap = {}
    for key, label in (("ttft_mean", "mean_ttft"), ("ttft_p99", "p99_ttft")):
        ours = [c["policies"][FASTLIBRA][key] for c in cells]
        lb = [c["policies"][LOWER_BOUND][key] for c in cells]
        gap[f"{label}_gap"] = _mean(a / b - 1 for a, b in zip(ours, lb, strict=True) if b)
        mo, ml = _mean(ours), _mean(lb)
        gap[f"{label}_gap_of_means"] = mo / ml - 1 if mo is not None and ml else None
    by_pair = {}
    for pair in dict.fromkeys(c["pair"] for c in cells):
        sub = [c for c in cells if c["pair"] == pair]
        by_pair[pair] = {o: {k: v for k, v in _reductions(sub, o).items()
                             if k.endswith("reduction")} for o in OTHERS}
    by_workload = {}
    for wl in dict.fromkeys(c["workload"] for c in cells):
        sub = [c for c in cells if c["workload"] == wl]
        by_workload[wl] = {o: {k: v for k, v in _reductions(sub, o).items()
                               if k.endswith("reduction")} for o in OTHERS}
    return {
        "threshold_s": THRESHOLD_S,
        "cells": len(cells),
        "vs": vs,
        "paper_ablations": paper_ablations(cells),
        "by_pair": by_pair,
        "by_workload": by_workload,
        "peak_load": peaks,
        "lower_bound_gap": gap,
        "oracle_shares": {cell_id(c): c["oracle"]["share"] for c in cells},
        "cells_with_rejections": {cell_id(c): {p: r["rejected"] for p, r in c["policies"].items()
                                               if r.get("rejected")}
                                  for c in cells
                                  if any(r.get("rejected") for r in c["policies"].values())},
    }


# -- text, markdown and plots -----------------------------------------------------------------

SHORT = {"fastlibra": "fastlibra", "vllm": "vllm", "vllm-offload": "vllm-off", ORACLE: "oracle",
         "slora": "slora", "sglang": "sglang", "sglang-hicache": "hicache",
         "fastlibra-nodep": "nodep", "fastlibra-lru": "lru",
         PAPER: "paper", **{p: "p-" + p.rsplit("-", 1)[1][:5] for p in PAPER_ABLATIONS},
         LOWER_BOUND: "lower-bd"}
CELL_ORDER = ("fastlibra", "vllm", "vllm-offload", ORACLE, "slora", "sglang", "sglang-hicache",
              "fastlibra-nodep",
              "fastlibra-lru", PAPER, *PAPER_ABLATIONS, LOWER_BOUND)


def _ms(x: float | None) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x * 1e3:.0f}"


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f}%"


def _sorted_cells(cells: list[dict]) -> list[dict]:
    order = {w: i for i, w in enumerate(WORKLOADS)}
    return sorted(cells, key=lambda c: (c["pair"], order.get(c["workload"], 99), c["adapters"],
                                        c["rate"]))


def cell_lines(cells: list[dict]) -> list[str]:
    head = f"{'pair':28s} {'workload':11s} {'N':>4s} {'req/s':>6s} {'reqs':>6s} {'ws/bud':>6s}" + \
        "".join(f" {SHORT[p]:>9s}" for p in CELL_ORDER) + "  share"
    lines = [head, "-" * len(head)]
    for c in _sorted_cells(cells):
        row = f"{c['pair']:28s} {c['workload']:11s} {c['adapters']:4d} {c['rate']:6g} " \
              f"{c['requests']:6d} {c['working_set_over_budget']:5.1f}x"
        row += "".join(f" {_ms(c['policies'][p]['ttft_mean']):>9s}" for p in CELL_ORDER)
        lines.append(row + f"  {c['oracle']['share']:.2f}")
    lines.append("mean TTFT in ms per policy; ws/bud = working set (lower-bound footprint) / "
                 "device budget; share = vllm-oracle's best static adapter share")
    return lines


def summary_lines(summary: dict) -> list[str]:
    lines = ["fastlibra against each policy (per-cell 1 - fastlibra/other, mean over "
             f"{summary['cells']} cells; 'of means' = 1 - mean(fastlibra)/mean(other)):",
             f"  {'vs':16s} {'mean TTFT':>10s} {'of means':>9s} {'P99 TTFT':>9s} {'of means':>9s}"
             f" {'TPOT':>8s} {'x TTFT':>7s} {'peak load':>10s} {'better in':>10s}"]
    for o, v in summary["vs"].items():
        ratio = v["ttft_ratio_geomean"]
        lines.append(
            f"  {o:16s} {_pct(v['mean_ttft_reduction']):>10s} "
            f"{_pct(v['mean_ttft_reduction_of_means']):>9s} {_pct(v['p99_ttft_reduction']):>9s} "
            f"{_pct(v['p99_ttft_reduction_of_means']):>9s} {_pct(v['tpot_reduction']):>8s} "
            f"{'n/a' if ratio is None else f'{ratio:.2f}':>7s} "
            f"{_pct(v['peak_load_gain']):>10s} "
            f"{len(v['cells_where_better_than_fastlibra']):>4d} cells")
    lines.append("  x TTFT = geometric mean over cells of other/fastlibra mean TTFT; peak load = "
                 "mean gain over groups with both peaks uncensored; better in = cells where the "
                 "other policy's mean TTFT is lower by more than 1%")
    g = summary["lower_bound_gap"]
    lines.append(f"gap to the lower bound (fastlibra / unlimited-memory fastlibra - 1): mean TTFT "
                 f"{_pct(g['mean_ttft_gap'])} per cell, {_pct(g['mean_ttft_gap_of_means'])} of "
                 f"means; P99 {_pct(g['p99_ttft_gap'])} per cell")
    lines.append("fastlibra-paper ablations (mean TTFT without the term / with it; geometric "
                 "mean over cells, of means, the paper's):")
    lines += [f"  {p:28s} x{_x(a['ttft_ratio_geomean'])} x{_x(a['ttft_ratio_of_means'])} "
              f"(paper x{a['paper']:.2f})" for p, a in summary["paper_ablations"].items()]
    lines.append("peak load (req/s with mean TTFT < 500 ms, interpolated; '>=' / '<' = beyond "
                 "the measured rates):")
    lines.append(f"  {'group':44s}" + "".join(f" {SHORT[p]:>9s}" for p in CELL_ORDER))
    for gk, peaks in summary["peak_load"].items():
        lines.append(f"  {gk:44s}" + "".join(f" {_peak(peaks[p]):>9s}" for p in CELL_ORDER))
    return lines


def _peak(p: dict) -> str:
    prefix = {"above": ">=", "below": "<", None: ""}[p["censored"]]
    return f"{prefix}{p['rate']:.3g}"


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _host_text(cfg: dict) -> str:
    ratio = cfg.get("host_ratio")
    return "256 GiB" if ratio is None else f"{ratio:g} x the device budget"


def markdown_section(doc: dict) -> str:
    s, cfg, m = doc["summary"], doc["config"], doc["machine"]
    lines = [MARKER_START, "", "## Paper-style sweep (simulator)", "",
             f"Command: `{doc['command']}`  ",
             f"Machine: {m.get('cpu_count')} CPUs ({m.get('cpu')}), Python {m.get('python')}, "
             f"{cfg['jobs']} worker processes; wall time **{doc['wall_s']:.0f} s** for "
             f"{doc['runs']} simulations ({s['cells']} cells).  ",
             f"Code: {doc.get('code', {}).get('commit', '?')}"
             f"{' (uncommitted changes)' if doc.get('code', {}).get('dirty') else ''}.", "",
             "Setup: " + "; ".join(
                 f"{p['label']} rank {p['rank']}, device budget {p['budget_gib']:.2f} GiB"
                 for p in cfg["pairs"])
             + f". Budget rule: KV of {BUDGET_TOKENS} tokens + {BUDGET_ADAPTERS} adapters, the "
             f"same for every policy; host {_host_text(cfg)}. Workloads {', '.join(cfg['workloads'])}; "
             f"adapters {', '.join(map(str, cfg['adapters']))} (Zipf 1.0); "
             f"{cfg['duration_s']:g} s of arrivals, seed {cfg['seed']}. Rates per (pair, "
             "workload) "
             + ("from a calibration run (geometric from 0.6 x vLLM's saturation at the most "
                "adapters to 1.25 x FastLibra's at the fewest): " if cfg["calibration"]
                else "given by --rates: ")
             + "; ".join(f"{k}: {', '.join(f'{r:g}' for r in v)}" for k, v in cfg["rates"].items())
             + ". vllm-oracle = vllm with the best static adapter share of 0.05..0.95 per cell "
             "(step 0.05, stopping after 3 shares past the best without improvement); lower "
             "bound = fastlibra with unlimited device memory.", ""]
    lines += ["### FastLibra against each policy", "",
              "Reduction = per cell 1 - fastlibra/other, mean over cells (\"of means\": 1 - "
              "mean(fastlibra)/mean(other)). Peak load = highest rate with mean TTFT < 500 ms, "
              "linearly interpolated; gain averaged over (pair, workload, adapters) groups "
              "where neither peak is beyond the measured rates.", ""]
    rows = []
    for o, v in s["vs"].items():
        ratio = v["ttft_ratio_geomean"]
        rows.append([o, _pct(v["mean_ttft_reduction"]), _pct(v["mean_ttft_reduction_of_means"]),
                     _pct(v["p99_ttft_reduction"]), _pct(v["p99_ttft_reduction_of_means"]),
                     _pct(v["tpot_reduction"]), "n/a" if ratio is None else f"x{ratio:.2f}",
                     f"{_pct(v['peak_load_gain'])} ({v['peak_load_gain_groups']} groups)",
                     str(len(v["cells_where_better_than_fastlibra"]))])
    lines += _md_table(["vs", "mean TTFT", "of means", "P99 TTFT", "of means", "TPOT",
                        "other/fastlibra TTFT (geomean)", "peak load gain",
                        "cells where other is >1% better"], rows)
    g = s["lower_bound_gap"]
    lines += ["", f"Gap to the lower bound (fastlibra / unlimited memory - 1): mean TTFT "
              f"{_pct(g['mean_ttft_gap'])} per cell ({_pct(g['mean_ttft_gap_of_means'])} of "
              f"means), P99 TTFT {_pct(g['p99_ttft_gap'])} per cell.", ""]
    lines += ["fastlibra-paper without each Eval term: mean TTFT over fastlibra-paper's "
              "(geometric mean over cells; of means), beside the paper's own ablation.", ""]
    lines += _md_table(["ablation", "x TTFT (geomean)", "x TTFT (of means)", "paper"],
                       [[p, f"x{_x(a['ttft_ratio_geomean'])}", f"x{_x(a['ttft_ratio_of_means'])}",
                         f"x{a['paper']:.2f}"] for p, a in s["paper_ablations"].items()])
    lines.append("")
    odd = [(o, x) for o, v in s["vs"].items() for x in v["cells_where_better_than_fastlibra"]]
    if odd:
        lines += ["Cells where another policy's mean TTFT is more than 1% below fastlibra's:", ""]
        lines += [f"- {x['cell']}: {o} {x[f'{o}_ms']:.0f} ms vs fastlibra "
                  f"{x['fastlibra_ms']:.0f} ms" for o, x in odd]
        lines.append("")
    lines += ["### Peak load (req/s)", ""]
    lines += _md_table(["pair / workload / adapters"] + [SHORT[p] for p in CELL_ORDER],
                       [[gk] + [_peak(pk[p]) for p in CELL_ORDER]
                        for gk, pk in s["peak_load"].items()])
    lines += ["", "### Mean TTFT per cell (ms)", ""]
    lines += _md_table(["pair", "workload", "N", "req/s", "requests", "working set / budget"]
                       + [SHORT[p] for p in CELL_ORDER] + ["oracle share"],
                       [[c["pair"], c["workload"], str(c["adapters"]), f"{c['rate']:g}",
                         str(c["requests"]), f"{c['working_set_over_budget']:.1f}x"]
                        + [_ms(c["policies"][p]["ttft_mean"]) for p in CELL_ORDER]
                        + [f"{c['oracle']['share']:.2f}"] for c in _sorted_cells(doc["cells"])])
    lines += ["", MARKER_END, ""]
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    """Replace the text between the markers, or append the section if they are absent."""
    text = path.read_text() if path.exists() else ""
    i, j = text.find(MARKER_START), text.find(MARKER_END)
    if i >= 0 and j > i:
        new = text[:i] + section.rstrip("\n") + text[j + len(MARKER_END):]
    else:
        new = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(new)


def plot_sweep(cells: list[dict], out: Path) -> list[Path]:
    from fastlibra.bench.report import pyplot
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["pair"], c["workload"]), []).append(c)
    for (pair, wl), cs in groups.items():
        adapters = sorted({c["adapters"] for c in cs})
        fig, axes = plt.subplots(1, len(adapters), figsize=(4 * len(adapters), 3.6),
                                 sharey=True, squeeze=False)
        for ax, n in zip(axes[0], adapters, strict=True):
            sub = sorted((c for c in cs if c["adapters"] == n), key=lambda c: c["rate"])
            for p in CELL_ORDER:
                ax.plot([c["rate"] for c in sub],
                        [c["policies"][p]["ttft_mean"] * 1e3 for c in sub], marker="o",
                        label=p, ls="--" if p in (LOWER_BOUND, ORACLE) else "-")
            ax.axhline(THRESHOLD_S * 1e3, color="grey", ls=":", lw=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("request rate (req/s)")
            ax.set_title(f"{n} adapters")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("mean TTFT (ms)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{wl}, {pair}")
        fig.tight_layout()
        path = out / f"ttft_vs_rate_{pair.replace('@', '_')}_{wl}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- the command ------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _pairs(text: str) -> list[Pair]:
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (3, 4):
            raise SystemExit(f"--pairs: expected model:hardware:tp[:rank], got {item!r}")
        out.append(Pair(parts[0], parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4
                        else 32))
    return out


def command_line(args) -> str:
    """The command, rebuilt from the parsed options (argv is not passed down)."""
    parts = ["fastlibra", "bench", "paper"]
    if args.quick:
        parts.append("--quick")
    for opt in ("pairs", "workloads", "adapters", "rates", "num_rates", "duration", "jobs",
                "host_ratio", "seed", "json", "markdown", "plot"):
        v = getattr(args, opt, None)
        if v is None or (opt == "seed" and v == 0):
            continue
        if isinstance(v, list):
            v = ",".join(f"{x:g}" for x in v)
        elif isinstance(v, float):
            v = f"{v:g}"
        parts += [f"--{opt.replace('_', '-')}", str(v)]
    return " ".join(parts)


def run_paper(args) -> int:
    from fastlibra.bench.report import run_facts, write_json

    t_start = time.perf_counter()
    quick = args.quick
    pairs = _pairs(args.pairs) if args.pairs else list(PAIRS_QUICK if quick else PAIRS_FULL)
    workloads = [w.strip() for w in args.workloads.split(",")] if args.workloads \
        else list(WORKLOADS)
    adapters = sorted(_ints(args.adapters)) if args.adapters \
        else list(ADAPTERS_QUICK if quick else ADAPTERS_FULL)
    duration = args.duration or (60.0 if quick else 300.0)
    num_rates = args.num_rates or (3 if quick else 4)
    jobs = args.jobs or os.cpu_count() or 1
    for p in pairs:
        p.profile()  # fail early on an unknown model / GPU
    print(f"paper sweep: {len(pairs)} pair(s) x {len(workloads)} workload(s) x "
          f"{len(adapters)} adapter count(s) x {'given' if args.rates else num_rates} rates; "
          f"{duration:g} s of arrivals; {jobs} worker(s)")
    for p in pairs:
        print(f"  {p.label}: rank {p.rank}, device budget {p.budget_bytes() / 2**30:.2f} GiB "
              f"({BUDGET_TOKENS} tokens of KV + {BUDGET_ADAPTERS} adapters), host "
              f"{p.host_bytes(args.host_ratio) / 2**30:.2f} GiB")

    runs = 0
    rates: dict[str, list[float]] = {}
    calibration: dict[str, dict] = {}
    if args.rates:
        for p in pairs:
            for w in workloads:
                rates[f"{p.label}/{w}"] = sorted(args.rates)
    else:
        cal_duration = min(duration, 120.0)
        cal_jobs = {}
        for p in pairs:
            for w in workloads:
                cal_jobs[(p.label, w, "vllm")] = saturation_job(
                    p, w, adapters[-1], "vllm", cal_duration, args.seed, args.host_ratio)
                cal_jobs[(p.label, w, FASTLIBRA)] = saturation_job(
                    p, w, adapters[0], FASTLIBRA, cal_duration, args.seed, args.host_ratio)
        with tqdm(total=0, unit="run", desc="calibrating rates", dynamic_ncols=True) as bar:
            sats = drive(cal_jobs, jobs, bar)
            runs += bar.n
        for p in pairs:
            for w in workloads:
                sv, sf = sats[(p.label, w, "vllm")], sats[(p.label, w, FASTLIBRA)]
                key = f"{p.label}/{w}"
                rates[key] = rate_ladder(sv, sf, num_rates)
                calibration[key] = {"sat_vllm_max_adapters": sv, "sat_fastlibra_min_adapters": sf,
                                    "duration_s": cal_duration}
                print(f"  {key}: vllm saturates at {sv:.3g} req/s ({adapters[-1]} adapters), "
                      f"fastlibra at {sf:.3g} ({adapters[0]}); rates "
                      + ", ".join(f"{r:g}" for r in rates[key]))

    cell_jobs = {}
    for p in pairs:
        for w in workloads:
            for n in adapters:
                for r in rates[f"{p.label}/{w}"]:
                    cell_jobs[(p.label, w, n, r)] = cell_job(p, w, n, r, duration, args.seed,
                                                             args.host_ratio)
    with tqdm(total=0, unit="run", desc=f"{len(cell_jobs)} cells", dynamic_ncols=True) as bar:
        cells = list(drive(cell_jobs, jobs, bar).values())
        runs += bar.n
    cells = _sorted_cells(cells)
    summary = summarize(cells)
    wall = time.perf_counter() - t_start

    print()
    print("\n".join(cell_lines(cells)))
    print()
    print("\n".join(summary_lines(summary)))
    top_check = {}
    for key, rs in rates.items():
        top = [c for c in cells if f"{c['pair']}/{c['workload']}" == key and c["rate"] == rs[-1]]
        top_check[key] = all(c["policies"]["vllm"]["ttft_mean"] > THRESHOLD_S for c in top)
    unsat = [k for k, ok in top_check.items() if not ok]
    if unsat:
        print("note: vllm stays under 500 ms at the top rate in some cells of: " + ", ".join(unsat))
    print(f"\nwall time {wall:.1f} s for {runs} simulations ({jobs} workers)")

    command = command_line(args)
    doc = {
        "command": command,
        "machine": run_facts(),
        "wall_s": wall,
        "runs": runs,
        "config": {
            "quick": quick, "jobs": jobs, "duration_s": duration, "seed": args.seed,
            "pairs": [dict(asdict(p), label=p.label, budget_gib=p.budget_bytes() / 2**30)
                      for p in pairs],
            "workloads": workloads, "adapters": adapters, "zipf": 1.0,
            "rates": rates, "calibration": calibration,
            "budget_rule": {"tokens": BUDGET_TOKENS, "adapters": BUDGET_ADAPTERS},
            "host_ratio": args.host_ratio,
            "host_memory_gib": {p.label: p.host_bytes(args.host_ratio) / 2**30 for p in pairs},
            "threshold_s": THRESHOLD_S,
            "oracle": {"shares": list(SHARES), "patience": ORACLE_PATIENCE},
            "policies": list(ALL_POLICIES),
            "vllm_under_threshold_at_top_rate": unsat,
        },
        "cells": cells,
        "summary": summary,
    }
    if args.json:
        write_json(args.json, doc)
    if args.markdown:
        write_markdown(Path(args.markdown), markdown_section(doc))
        print(f"wrote {args.markdown}")
    if args.plot:
        paths = plot_sweep(cells, Path(args.plot))
        print("plots: " + ", ".join(str(p) for p in paths))
    return 0
