"""`fastlibra bench replicas`: the Ray Serve application on this machine, measured.

    1. ingress overhead   one replica behind the ingress against one in-process server
                          (the same model and budget), sequential tiny completions,
                          interleaved: p50 latency difference
    2. routers            N replicas of `bench replay`'s model, the same per-replica
                          budgets, redeployed per router (every run starts cold), the same
                          multi-turn multi-adapter replay (`bench serve`'s client) through
                          each: mean and P99 TTFT, cached prompt share

Both in one process run, so the ratios compare like with like. Results: a table, JSON
(`--json`) and a bar plot of TTFT per router (`--plot`).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx

from fastlibra.bench.replay import build_assets, default_budget
from fastlibra.bench.report import pyplot, run_facts, write_json
from fastlibra.bench.serve import Prompts, _bench, summarize

TARGETS = {"least-loaded": 0.30, "multiplex": 0.15}
"""fastlibra's mean TTFT below these routers' (issue 17); overhead target 5 ms p50."""
OVERHEAD_TARGET_MS = 5.0


def _status(msg: str) -> None:
    print(f"[bench replicas] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cfg(base: Path, adapters: dict[str, Path], args, device: int, host: int):
    from fastlibra.server import ServerConfig

    return ServerConfig(base, dict(adapters), served_model_name="replay", device="cpu",
                        dtype=args.dtype, device_memory=device, host_memory=host,
                        policy=args.policy if isinstance(args.policy, str) else args.policy[0])


class _InProcess:
    """`fastlibra serve` in this process (uvicorn on a thread): the overhead baseline."""

    def __init__(self, cfg) -> None:
        import uvicorn

        from fastlibra.llm import AsyncLLM
        from fastlibra.server import build_app

        self.engine = AsyncLLM(cfg.make_llm())
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.engine, cfg),
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()


def _latencies(url: str, n: int) -> list[float]:
    body = {"model": "replay", "prompt": [5, 6, 7, 8], "max_tokens": 1, "temperature": 0}
    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(n):
            t = time.perf_counter()
            r = c.post("/v1/completions", json=body)
            out.append((time.perf_counter() - t) * 1e3)
            r.raise_for_status()
    return out


def measure_overhead(server_cfg, cluster_url: str, n: int) -> dict:
    """p50 of the same request against the cluster and an in-process server, in rounds
    of 20 alternating between them, so load drift hits both alike."""
    single = _InProcess(server_cfg)
    try:
        _latencies(single.url, 10), _latencies(cluster_url, 10)  # warm both
        one, many = [], []
        for _ in range(max(1, n // 20)):
            one += _latencies(single.url, 20)
            many += _latencies(cluster_url, 20)
    finally:
        single.stop()
    p50_one, p50_many = statistics.median(one), statistics.median(many)
    return {"requests": len(one), "single_p50_ms": p50_one, "cluster_p50_ms": p50_many,
            "overhead_p50_ms": p50_many - p50_one, "target_ms": OVERHEAD_TARGET_MS,
            "met": p50_many - p50_one <= OVERHEAD_TARGET_MS}


def _replay_args(args, url: str) -> argparse.Namespace:
    """`bench serve`'s client settings: this command's workload flags, this URL."""
    return argparse.Namespace(**{
        **vars(args), "url": url, "api_key": None, "max_concurrency": None,
        "timeout": 600.0, "model": "replay", "adapters": None, "max_context": 1024,
        "workload": "chatbot", "num_adapters": args.adapters})


def run_router(cfg, args) -> dict:
    """Deploy `cfg` fresh, replay the workload through it, take it down."""
    from fastlibra.server.cluster import ClusterServer

    server = ClusterServer(cfg).start()
    try:
        prompts = Prompts("ids", args.vocab, 3, "w{:03d}")
        res = asyncio.run(_bench(_replay_args(args, server.url), prompts))
    finally:
        server.stop()
    return summarize(res["records"], res["wall_s"])


def plot(results: dict[str, dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [results[n]["ttft_mean_ms"] for n in names], 0.4,
           label="mean")
    ax.bar([x + 0.2 for x in xs], [results[n]["ttft_p99_ms"] for n in names], 0.4,
           label="P99")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("2 replicas on Ray Serve: TTFT by router (same replay, same budgets)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_replicas_bench(args) -> int:
    import ray
    from ray import serve

    from fastlibra.server.cluster import ClusterConfig, ClusterServer, start_ray

    with tempfile.TemporaryDirectory(prefix="fastlibra-bench-replicas-") as tmp:
        base, adapters = build_assets(Path(tmp), args)
        device, host = default_budget(args, adapters)
        server_cfg = _server_cfg(base, adapters, args, device, host)
        _status(f"model and {len(adapters)} adapters built; per replica device "
                f"{device / 2**20:.2f} MiB, host {host / 2**20:.2f} MiB")
        cfg = ClusterConfig(replace(server_cfg, port=_free_port()), replicas=args.replicas,
                            replica_cpus=1.0, routing_stats_period_s=args.routing_stats_period,
                            app_name="bench-replicas")
        start_ray(replace(cfg, ingress="ray"))  # Serve's proxy on its port, for "ray"
        overhead = {}
        results = {}
        try:
            for ingress in ("ray", "local") if args.overhead_requests else ():
                port = cfg.server.port if ingress == "ray" else _free_port()
                one = replace(cfg, replicas=1, ingress=ingress, app_name=f"overhead-{ingress}",
                              server=replace(cfg.server, port=port))
                server = ClusterServer(one).start()
                try:
                    _status(f"{ingress} ingress overhead: {args.overhead_requests} requests "
                            "each way")
                    overhead[ingress] = measure_overhead(server_cfg, server.url,
                                                         args.overhead_requests)
                finally:
                    server.stop()
                o = overhead[ingress]
                _status(f"  p50 {o['cluster_p50_ms']:.2f} ms through it, "
                        f"{o['single_p50_ms']:.2f} ms in process")
            for router in args.routers:
                _status(f"router {router}: {args.replicas} replicas ({args.ingress} ingress), "
                        f"replay of {args.duration:.0f} s at {args.rate}/s")
                # an application of its own: Ray keeps one router per deployment handle
                # in this process, and a redeployed app of the same name would reuse it
                results[router] = run_router(replace(cfg, router=router, ingress=args.ingress,
                                                     app_name=f"bench-{router}",
                                                     server=replace(cfg.server, port=(
                                                         cfg.server.port
                                                         if args.ingress == "ray"
                                                         else _free_port()))), args)
                s = results[router]
                _status(f"  mean TTFT {s['ttft_mean_ms']:.1f} ms, P99 {s['ttft_p99_ms']:.1f} "
                        f"ms, {s['errors']} errors")
        finally:
            serve.shutdown()
            ray.shutdown()
    out = {"machine": run_facts(), "replicas": args.replicas, "ingress": args.ingress,
           "routers": results,
           "overhead": overhead, "reduction_vs": {}}
    print(f"{'router':<14} {'mean TTFT ms':>13} {'P99 TTFT ms':>12} {'cached':>8} "
          f"{'done':>6} {'errors':>6}")
    for r, s in results.items():
        print(f"{r:<14} {s['ttft_mean_ms']:>13.1f} {s['ttft_p99_ms']:>12.1f} "
              f"{s['cached_fraction']:>8.1%} {s['completed']:>6} {s['errors']:>6}")
    if "fastlibra" in results:
        ours = results["fastlibra"]
        for r, s in results.items():
            if r == "fastlibra":
                continue
            red = 1 - ours["ttft_mean_ms"] / s["ttft_mean_ms"]
            red99 = 1 - ours["ttft_p99_ms"] / s["ttft_p99_ms"]
            out["reduction_vs"][r] = {"mean": red, "p99": red99}
            target = TARGETS.get(r)
            verdict = "" if target is None else \
                f" (target >= {target:.0%}: {'met' if red >= target else 'MISSED'})"
            print(f"fastlibra vs {r}: mean TTFT {red:+.1%} lower, P99 {red99:+.1%}{verdict}")
    for ingress, o in overhead.items():
        print(f"{ingress} ingress overhead p50: {o['overhead_p50_ms']:.2f} ms "
              f"({o['cluster_p50_ms']:.2f} vs {o['single_p50_ms']:.2f} ms in process; "
              f"target <= {OVERHEAD_TARGET_MS:.0f} ms: {'met' if o['met'] else 'MISSED'})")
    if args.plot and results:
        _status(f"wrote {plot(results, Path(args.plot))}")
    if args.json:
        write_json(args.json, out, _status)
    return 0
