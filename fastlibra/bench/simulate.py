"""`fastlibra simulate`: workloads x policies on the simulator, as a table, JSON and plots."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from fastlibra.bench.report import (
    CLUSTER_COLUMNS,
    format_table,
    plot_composition,
    plot_replicas_per_adapter,
    plot_ttft_cdf,
    plot_ttft_vs_rate,
    run_facts,
    write_json,
)
from fastlibra.config import ConfigError, LoraShape, ModelShape
from fastlibra.engine.request import Request
from fastlibra.sim.cluster import ClusterSetup, simulate_cluster
from fastlibra.sim.profiles import MODELS, SimProfile, resolve_gpu
from fastlibra.sim.simulate import SimSetup, adapter_names, count_requests, simulate
from fastlibra.traces import load_trace
from fastlibra.workloads import WorkloadSpec, make_workload


def resolve_model(spec: str) -> ModelShape:
    """A model of the table, or a Hugging Face model directory (or its config.json), so a
    user simulates the model they serve: its layers, widths, GQA and vocabulary size the KV,
    the adapters and the compute. Served in 16-bit, like the models of the table."""
    if spec in MODELS:
        return MODELS[spec]
    path = Path(spec)
    if path.name == "config.json" and path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"unknown model {spec!r}; choose from {', '.join(MODELS)}, or give "
                          "a Hugging Face model directory")
    from fastlibra.model.loader import load_config  # imports torch: only for a directory

    return replace(load_config(path).shape(dtype_bytes=2), name=path.resolve().name)


def named_profile(model: str, hardware: str, tp: int = 1, lora_rank: int = 32) -> SimProfile:
    """`model` and `hardware` by name, or as a model directory and a JSON file."""
    return SimProfile(resolve_model(model), resolve_gpu(hardware), tp, LoraShape(rank=lora_rank))


def build_requests(workload: str, rate: float, num_adapters: int, zipf: float,
                   duration: float, seed: int) -> list[Request]:
    """Requests of a generator at `rate` requests/s (all turns counted), or a trace file.

    Generators take a rate of sessions (or bursts); we generate once, measure the request
    rate that gives, and rescale, so `--rate` means requests per second for every workload.
    """
    if workload.startswith("trace:"):
        return load_trace(workload[len("trace:"):], seed=seed)
    spec = WorkloadSpec(name=workload, num_adapters=num_adapters, zipf=zipf, rate=rate,
                        duration=duration, seed=seed)
    measured = count_requests(make_workload(spec)) / duration
    if measured > 0:
        spec = replace(spec, rate=rate * rate / measured)
    return make_workload(spec)


DEFAULT_POLICIES = ["fastlibra", "vllm", "slora", "sglang"]


def run_simulate(args) -> int:
    profile = named_profile(args.model, args.hardware, args.tp, args.adapter_rank)
    setup = SimSetup(profile, device_memory=args.device_memory, host_memory=args.host_memory,
                     adapters_in_host=not args.adapters_from_disk,
                     adapter_share=args.adapter_share)
    cfg = setup.cache_config()
    print(f"{profile.model.name} on {args.tp} x {profile.gpu.name}: device pool {cfg.device_blocks} blocks "
          f"({cfg.device_blocks * cfg.block_bytes / 2**30:.1f} GiB), host pool "
          f"{cfg.host_blocks} blocks; adapters of rank {args.adapter_rank} take "
          f"{cfg.blocks_for_bytes(profile.lora.nbytes(profile.model))} blocks each")
    if args.replicas is not None:
        return _run_cluster(args, setup)
    args.policy = args.policy or DEFAULT_POLICIES
    by_rate: dict[float, dict[str, dict]] = {}
    for rate in args.rate:
        requests = build_requests(args.workload, rate, args.num_adapters, args.zipf,
                                  args.duration, args.seed)
        n = count_requests(requests)
        num_adapters = len(adapter_names(requests))
        results = {}
        with tqdm(total=n * len(args.policy), unit="req", leave=False,
                  desc=f"{args.workload} @ {rate:g} req/s") as bar:
            for policy in args.policy:
                bar.set_postfix_str(policy)
                results[policy] = simulate(policy, requests, setup, bar)
        by_rate[rate] = results
        print(f"\n{args.workload} at {rate:g} req/s ({n} requests, {num_adapters} adapters):")
        print(format_table(results))
    first = by_rate[args.rate[0]]
    if args.output_json:
        def strip(res):
            return {p: {k: v for k, v in r.items() if k not in ("timeline", "ttfts")}
                    for p, r in res.items()}
        doc = {"workload": args.workload, "model": args.model, "hardware": args.hardware,
               "tp": args.tp, "num_adapters": args.num_adapters, "seed": args.seed,
               "rate": args.rate[0], "policies": strip(first),
               "by_rate": {str(r): {"policies": strip(res)} for r, res in by_rate.items()}}
        write_json(args.output_json, doc)
    if args.plot:
        _plots(by_rate, args, f"{args.workload}, {args.model}, {args.tp}x{args.hardware}",
               lambda policy, result, out: plot_composition(
                   result, policy, out / f"composition_{policy}.png"))
    return 0


def _plots(by_rate: dict[float, dict[str, dict]], args, title: str, each) -> None:
    """TTFT CDF at the first rate, TTFT vs rate (with several), and `each(label, result,
    dir)` per policy or router at the first rate."""
    out = Path(args.plot)
    out.mkdir(parents=True, exist_ok=True)
    first = by_rate[args.rate[0]]
    paths = [plot_ttft_cdf(first, out / "ttft_cdf.png", f"{title}, {args.rate[0]:g} req/s")]
    if len(by_rate) > 1:
        paths.append(plot_ttft_vs_rate(by_rate, out / "ttft_vs_rate.png", title))
    paths += [each(label, result, out) for label, result in first.items()]
    print("plots: " + ", ".join(str(p) for p in paths))


def _run_cluster(args, setup: SimSetup) -> int:
    """`--replicas N`: the workload at each rate through N engines, once per router (and
    cache policy), in one process; table, JSON, and plots of TTFT vs rate and of the
    replicas holding each hot adapter over time."""
    if args.replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {args.replicas}")
    cluster = ClusterSetup(setup, args.replicas, publish_interval_s=args.publish_interval)
    policies = args.policy or ["fastlibra"]
    runs = [(r, p, r if len(policies) == 1 else f"{r}/{p}")
            for r in args.router for p in policies]
    by_rate: dict[float, dict[str, dict]] = {}
    for rate in args.rate:
        requests = build_requests(args.workload, rate, args.num_adapters, args.zipf,
                                  args.duration, args.seed)
        n = count_requests(requests)
        results = {}
        for router, policy, label in runs:
            start = time.perf_counter()
            with tqdm(total=n, unit="req", leave=False, desc=f"{label} @ {rate:g} req/s") as bar:
                results[label] = simulate_cluster(router, policy, requests, cluster, args.seed, bar)
            results[label]["wall_s"] = time.perf_counter() - start
        by_rate[rate] = results
        print(f"\n{args.workload} at {rate:g} req/s on {args.replicas} replicas ({n} requests, "
              f"{len(adapter_names(requests))} adapters):")
        print(format_table(results, CLUSTER_COLUMNS, "router"))
        print("simulated in " + ", ".join(f"{k} {r['wall_s']:.1f} s" for k, r in results.items()))
    first = by_rate[args.rate[0]]
    if args.output_json:
        def strip(res):
            return {k: {f: v for f, v in r.items() if f != "ttfts"} for k, r in res.items()}
        write_json(args.output_json, {
            "workload": args.workload, "model": args.model, "hardware": args.hardware,
            "replicas": args.replicas, "num_adapters": args.num_adapters, "zipf": args.zipf,
            "seed": args.seed, "publish_interval_s": args.publish_interval,
            "rate": args.rate[0], "routers": strip(first),
            "by_rate": {str(r): {"routers": strip(res)} for r, res in by_rate.items()},
            "machine": run_facts()})
    if args.plot:
        _plots(by_rate, args, f"{args.workload}, {args.replicas} replicas",
               lambda label, result, out: plot_replicas_per_adapter(
                   result, label, out / f"replicas_per_adapter_{label.replace('/', '_')}.png"))
    return 0
