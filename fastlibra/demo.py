"""`fastlibra demo`: a multi-turn, multi-adapter chat replayed in real time on the real
engine once per cache policy, side by side, so the first thing a user runs shows what
the cache changes with nothing to download.

    model (built once)   `build_tiny_model`: a random Llama (hidden 256, 4 layers, vocab
                         32000, fp32) + 6 LoRAs of ranks 16/8, in $FASTLIBRA_CACHE_DIR or
                         ~/.cache/fastlibra/<folder named by the build parameters>;
                         `manifest.json` is written last, so an interrupted build is redone
    replay               `bench replay`'s chatbot and replay loop (model/replay.py) with
                         --duration s of session arrivals; every policy gets the same
                         device budget (the adapters + 4 contexts of 256 tokens of KV), so
                         the pool is under pressure and the policies keep different things
    report               a table on stdout, TTFT CDF + mean TTFT bars as a PNG, JSON
    --serve              the HTTP server on the same model and adapters instead
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastlibra.bench.report import write_json
from fastlibra.model.tiny import TINY_SHAPE, build_tiny_model

NUM_ADAPTERS = 6
RANKS = (16, 8)
MODEL_SEED = 0
BUILD_FORMAT = 1
"""Bump when `build_tiny_model` writes different files, so cached builds are redone."""
MANIFEST = "manifest.json"
MiB = 1 << 20


@dataclass(frozen=True)
class DemoSettings:
    """The workload, model and budget settings replay.py reads (the names of `bench
    replay`'s flags), at the demo's values: sessions arrive 3x as fast as in `bench
    replay` and think half as long, so a short run still has many follow-up turns and a
    busy pool."""

    duration: float
    seed: int
    rate: float = 3.0
    think: float = 0.7
    mean_turns: float = 4.0
    zipf: float = 1.0
    system_len: int = 64
    user_len: int = 32
    answer_len: int = 16
    conversations: int = 4
    device_memory: int | None = None
    host_memory: int | None = None
    adapters: int = NUM_ADAPTERS
    rank_hi: int = RANKS[0]
    rank_lo: int = RANKS[1]
    vocab: int = TINY_SHAPE["vocab_size"]
    hidden: int = TINY_SHAPE["hidden_size"]
    layers: int = TINY_SHAPE["num_hidden_layers"]
    heads: int = TINY_SHAPE["num_attention_heads"]
    kv_heads: int = TINY_SHAPE["num_key_value_heads"]
    intermediate: int = TINY_SHAPE["intermediate_size"]
    device: str = "cpu"
    dtype: str = "float32"


SERVED_NAME = "fastlibra-demo"
"""The base model's id in `model` fields under `demo --serve` (adapters: lora-0, ...)."""


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    env = os.environ.get("FASTLIBRA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fastlibra"


def cached_model() -> tuple[Path, dict[str, Path]]:
    """The demo's model and adapters, built on first use and read from the cache after."""
    params = {"format": BUILD_FORMAT, "num_adapters": NUM_ADAPTERS, "ranks": list(RANKS),
              "seed": MODEL_SEED, "shape": TINY_SHAPE}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir() / f"demo-model-{key}"
    manifest = root / MANIFEST
    if manifest.exists():
        _log(f"using the model and adapters cached in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)  # an interrupted build
        _log(f"building a random Llama and {NUM_ADAPTERS} LoRA adapters in {root} (once)")
        t = time.perf_counter()
        base, adapters = build_tiny_model(root, num_adapters=NUM_ADAPTERS, ranks=RANKS,
                                          seed=MODEL_SEED)
        manifest.write_text(json.dumps({
            **params, "model": base.name, "adapters": {n: p.name for n, p in adapters.items()},
        }, indent=2) + "\n")
        _log(f"built in {time.perf_counter() - t:.1f} s")
    saved = json.loads(manifest.read_text())
    return root / saved["model"], {n: root / p for n, p in saved["adapters"].items()}


def run_demo(args) -> int:
    base, adapters = cached_model()
    if args.serve:
        from fastlibra.server import serve

        policy = args.policy[0]
        _log(f"serving {SERVED_NAME} with adapters {', '.join(adapters)} under {policy} on "
             f"http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
        serve(base, adapters, host=args.host, port=args.port, policy=policy,
              served_model_name=SERVED_NAME)
        return 0
    result = replay_policies(base, adapters, args.policy, DemoSettings(args.duration, args.seed))
    print(format_table(result["policies"]))
    plot = Path(args.plot)
    write_plot(result, plot)
    _log(f"wrote {plot}")
    if args.json:
        write_json(args.json, result, _log)
    return 0


def replay_policies(base: Path, adapters: dict[str, Path], policies: list[str],
                    settings: DemoSettings) -> dict:
    """The same workload and budget through each policy: {"workload", "budget",
    "policies": {name: summary row}, "ttft_ms": {name: per-request TTFTs}}."""
    import torch

    from fastlibra.bench.replay import default_budget, replay_policy, workload_spec
    from fastlibra.workloads import iter_turns, make_workload

    torch.set_num_threads(1)  # tiny matmuls: more threads only add spin-waiting
    firsts = make_workload(workload_spec(settings))
    turns = len(list(iter_turns(firsts)))
    if not turns:
        raise ValueError("the workload is empty; raise --duration")
    device, host = default_budget(settings, adapters)
    _log(f"workload: {len(firsts)} chat sessions, {turns} turns over {len(adapters)} adapters "
         f"(Zipf {settings.zipf}), {settings.duration:.0f} s of arrivals; device budget "
         f"{device / MiB:.2f} MiB (adapters + {settings.conversations} x 256 tokens of KV), "
         f"host {host / MiB:.1f} MiB")
    rows, ttfts = {}, {}
    for policy in policies:
        _log(f"replaying through {policy} in real time (~{settings.duration:.0f} s + the "
             "last turns)")
        r = replay_policy(policy, base, adapters, [x.fresh_copy() for x in firsts], settings,
                          device, host, log=_log)
        ttfts[policy] = [1e3 * d["ttft"] for d in r.pop("requests_detail")]
        r["adapter_loads"] = r["adapter_host_hits"] + r["adapter_disk_loads"]
        rows[policy] = r
        _log(f"  {policy}: {r['requests']} requests, mean TTFT {r['ttft_mean_ms']:.1f} ms")
    return {"workload": {"sessions": len(firsts), "turns": turns, "adapters": len(adapters),
                         "duration_s": settings.duration, "rate": settings.rate,
                         "seed": settings.seed},
            "budget": {"device_bytes": device, "host_bytes": host},
            "policies": rows, "ttft_ms": ttfts}


def format_table(rows: dict[str, dict]) -> str:
    head = (f"{'policy':<10} {'reqs':>5} {'TTFT mean':>10} {'p99':>9} {'dev hit':>8} "
            f"{'host hit':>9} {'invalid KV':>11} {'(peak)':>7} {'moved MiB':>10} "
            f"{'adapter loads':>14}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<10} {r['requests']:>5} {r['ttft_mean_ms']:>8.1f}ms "
                     f"{r['ttft_p99_ms']:>7.1f}ms {r['device_hit_rate']:>8.1%} "
                     f"{r['host_hit_rate']:>9.1%} {r['invalid_kv_blocks_mean']:>11.1f} "
                     f"{r['invalid_kv_blocks_peak']:>7} "
                     f"{sum(r['bytes_moved'].values()) / MiB:>10.2f} {r['adapter_loads']:>14}")
    if "fastlibra" in rows:
        ours = rows["fastlibra"]["ttft_mean_ms"]
        for name, r in rows.items():
            if name != "fastlibra":
                cut = 1 - ours / r["ttft_mean_ms"]
                lines.append(f"fastlibra mean TTFT vs {name}: {abs(cut):.0%} "
                             f"{'lower' if cut >= 0 else 'higher'}")
    lines.append("hit rates: prompt tokens whose KV came from the device / host pool; invalid "
                 "KV: device blocks of KV whose\nadapter is not on the device (mean over "
                 "steps, peak); moved: bytes copied between disk, host and device;\nadapter "
                 "loads: requests whose adapter had to be brought to the device. Real time on "
                 "this machine's CPU.")
    return "\n".join(lines)


def write_plot(result: dict, path: Path) -> None:
    """TTFT CDF per policy (left) and mean TTFT per policy (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    cdf, bars = fig.subplots(1, 2, width_ratios=(3, 2))
    for name, ttft in result["ttft_ms"].items():
        xs = sorted(ttft)
        cdf.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
    cdf.set(xscale="log", xlabel="TTFT (ms, log scale)", ylabel="share of requests",
            title="TTFT CDF")
    cdf.grid(alpha=0.3)
    cdf.legend()
    rows = result["policies"]
    means = [r["ttft_mean_ms"] for r in rows.values()]
    bars.bar(list(rows), means, color=[f"C{i}" for i in range(len(rows))])
    for i, m in enumerate(means):
        bars.annotate(f"{m:.1f}", (i, m), ha="center", va="bottom")
    bars.set(ylabel="ms", title="mean TTFT")
    w = result["workload"]
    fig.suptitle(f"fastlibra demo: {w['turns']} chat turns over {w['adapters']} LoRA "
                 "adapters, real engine on CPU, same device budget")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
