"""`fastlibra simulate`: workloads x policies on the simulator, as a table, JSON and plots."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from fastlibra.bench.report import (
    format_table,
    plot_composition,
    plot_ttft_cdf,
    plot_ttft_vs_rate,
    write_json,
)
from fastlibra.config import ConfigError, LoraShape, ModelShape
from fastlibra.engine.request import Request
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
        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        title = f"{args.workload}, {args.model}, {args.tp}x{args.hardware}"
        paths = [plot_ttft_cdf(first, out / "ttft_cdf.png", f"{title}, {args.rate[0]:g} req/s")]
        if len(by_rate) > 1:
            paths.append(plot_ttft_vs_rate(by_rate, out / "ttft_vs_rate.png", title))
        for policy, result in first.items():
            paths.append(plot_composition(result, policy, out / f"composition_{policy}.png"))
        print("plots: " + ", ".join(str(p) for p in paths))
    return 0
