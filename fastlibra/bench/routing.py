"""`fastlibra bench routing`: how long one routing decision takes, per router.

A cluster in a steady state is drawn once (seeded): every replica publishes the tiers of
`--adapters` adapters (a fifth on device, half on host, the rest on disk) and the prefix
hashes of `--sessions-per-replica` conversations of 500-4,000 tokens. Then `--requests`
requests are routed one after another, each a cached conversation grown by a new message
(half of them) or a new conversation, and finished at once, so the load stays as drawn.
The time of `Router.route` is what a request waits for its replica: hashing its prompt
and scoring every replica.
"""

from __future__ import annotations

import random
import time

import numpy as np

from fastlibra.bench.report import run_facts, write_json
from fastlibra.cache import Residency, Tier
from fastlibra.cache.tree import chain_hashes, chain_root
from fastlibra.config import HardwareProfile
from fastlibra.router import RouteCosts, RouteRequest, make_router

BLOCK_SIZE = 16


def _cluster(args, rng: random.Random):
    """(residency per replica, conversations as (adapter, tokens))."""
    names = [f"lora-{i}" for i in range(args.adapters)]
    conversations = []
    residencies = []
    for _ in range(args.replicas):
        tiers = {n: rng.choices([Tier.DEVICE, Tier.HOST, Tier.DISK], [0.2, 0.5, 0.3])[0]
                 for n in names}
        device: set[int] = set()
        for _ in range(args.sessions_per_replica):
            adapter = rng.choice(names)
            tokens = tuple(rng.randrange(32000) for _ in range(rng.randint(500, 4000)))
            conversations.append((adapter, tokens))
            device.update(chain_hashes(chain_root(adapter), tokens, BLOCK_SIZE))
        residencies.append(Residency(tiers, device, set()))
    return residencies, conversations


def run_routing_bench(args) -> int:
    rng = random.Random(args.seed)
    residencies, conversations = _cluster(args, rng)
    requests = []
    for k in range(args.requests):
        if rng.random() < 0.5:
            adapter, tokens = rng.choice(conversations)
        else:
            adapter, tokens = f"lora-{rng.randrange(args.adapters)}", ()
        message = tuple(rng.randrange(32000) for _ in range(rng.randint(20, 400)))
        requests.append((f"q{k}", adapter, tokens + message))
    costs = RouteCosts(HardwareProfile(), BLOCK_SIZE, BLOCK_SIZE * 524288, 160 * 2**20)
    results = {}
    print(f"{args.replicas} replicas, {args.adapters} adapters, "
          f"{args.sessions_per_replica} conversations cached per replica, "
          f"{args.requests} requests")
    for name in args.router:
        router = make_router(name, args.replicas, costs, args.seed)
        for i, res in enumerate(residencies):
            router.publish(i, Residency(dict(res.adapters), set(res.device_prefixes), set()))
        times = []
        for rid, adapter, prompt in requests:
            req = RouteRequest(rid, adapter, prompt, BLOCK_SIZE)
            start = time.perf_counter()
            router.route(req)
            times.append(time.perf_counter() - start)
            router.finish(rid)
        us = np.array(times) * 1e6
        results[name] = {"mean_us": float(us.mean()), "p50_us": float(np.percentile(us, 50)),
                         "p99_us": float(np.percentile(us, 99))}
        r = results[name]
        print(f"{name:13s} decision mean {r['mean_us']:7.1f} us  p50 {r['p50_us']:7.1f} us  "
              f"p99 {r['p99_us']:7.1f} us")
    if args.json:
        write_json(args.json, {"replicas": args.replicas, "adapters": args.adapters,
                               "sessions_per_replica": args.sessions_per_replica,
                               "requests": args.requests, "routers": results,
                               "machine": run_facts()})
    return 0
