"""`fastlibra bench scale`: many adapters (1,000 and 2,000) under three popularity shapes.

The workload is `translation` (single-turn requests, each adapter with its own
instruction prefix), so popularity alone decides reuse:

* random  - each request draws its adapter uniformly (Zipf alpha 0);
* distinct - request i uses adapter i mod N: every request in a window of N requests has
  its own adapter, so nothing is reused until the list wraps around;
* skewed  - Zipf alpha 1.0 over the N adapters.
"""

from __future__ import annotations

import time
from dataclasses import replace

from tqdm import tqdm

from fastlibra.bench.paper import reduction
from fastlibra.bench.simulate import named_profile
from fastlibra.sim.simulate import SimSetup, count_requests, simulate
from fastlibra.workloads import WorkloadSpec, make_workload

PATTERNS = ("random", "distinct", "skewed")


def scale_requests(pattern: str, num_adapters: int, rate: float, duration: float, seed: int):
    zipf = 1.0 if pattern == "skewed" else 0.0
    spec = WorkloadSpec(name="translation", num_adapters=num_adapters, zipf=zipf, rate=rate,
                        duration=duration, seed=seed)
    requests = make_workload(spec)
    if pattern == "distinct":
        requests = [replace(r, adapter=f"lora-{i % num_adapters}") for i, r in enumerate(requests)]
    return requests


def run_scale(args) -> int:
    profile = named_profile(args.model, args.hardware, args.tp, args.adapter_rank)
    setup = SimSetup(profile)
    cfg = setup.cache_config()
    per = cfg.blocks_for_bytes(profile.lora.nbytes(profile.model))
    print(f"{args.model} on {args.tp} x {args.hardware}: device pool {cfg.device_blocks} blocks; "
          f"an adapter of rank {args.adapter_rank} takes {per} blocks, so "
          f"{cfg.device_blocks // per} adapters alone fill the device")
    rows = []
    start = time.time()
    runs = [(n, p) for n in args.adapters for p in PATTERNS]
    with tqdm(total=len(runs) * len(args.policy), unit="run", leave=False) as bar:
        for n, pattern in runs:
            requests = scale_requests(pattern, n, args.rate, args.duration, args.seed)
            res = {}
            for policy in args.policy:
                bar.set_postfix_str(f"{n} {pattern} {policy}")
                res[policy] = simulate(policy, requests, setup)
                bar.update(1)
            rows.append((n, pattern, count_requests(requests), res))
    head = f"{'adapters':>8s} {'pattern':9s} {'requests':>8s} " + " ".join(
        f"{p + ' mean/p99 ms':>24s}" for p in args.policy)
    print(head)
    for n, pattern, count, res in rows:
        print(f"{n:8d} {pattern:9s} {count:8d} " + " ".join(
            f"{res[p]['ttft_mean'] * 1e3:11.1f} / {res[p]['ttft_p99'] * 1e3:9.1f}"
            for p in args.policy))
    if "fastlibra" in args.policy:
        for other in [p for p in args.policy if p != "fastlibra"]:
            cuts = [reduction(res["fastlibra"]["ttft_mean"], res[other]["ttft_mean"])
                    for _, _, _, res in rows]
            cuts = [c for c in cuts if c is not None]
            if cuts:
                print(f"fastlibra mean TTFT vs {other}: {sum(cuts) / len(cuts):+.1%} "
                      f"(mean of per-run reductions; negative = fastlibra slower)")
    print(f"wall time {time.time() - start:.0f} s")
    return 0
