"""What every benchmark reports with: the simulator's policy table, plots, and JSON that
records the machine and the commit it was measured on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

TABLE_COLUMNS = [
    ("ttft_mean", "TTFT mean", 1e3, "{:9.1f}"),
    ("ttft_p50", "p50", 1e3, "{:8.1f}"),
    ("ttft_p90", "p90", 1e3, "{:8.1f}"),
    ("ttft_p99", "p99", 1e3, "{:8.1f}"),
    ("tpot_mean", "TPOT", 1e3, "{:6.1f}"),
    ("throughput_rps", "req/s", 1, "{:6.2f}"),
    ("throughput_tps", "tok/s", 1, "{:7.0f}"),
    ("device_hit_rate", "dev hit", 100, "{:6.1f}%"),
    ("host_hit_rate", "host hit", 100, "{:6.1f}%"),
    ("invalid_kv_block_s", "invalid KV blk*s", 1, "{:16.0f}"),
    ("swap_in_gib", "swap in GiB", 1, "{:11.1f}"),
    ("swap_out_gib", "out GiB", 1, "{:8.1f}"),
    ("ttft_queue", "queue", 1e3, "{:8.1f}"),
    ("ttft_adapter", "adapter", 1e3, "{:7.1f}"),
    ("ttft_kv", "KV", 1e3, "{:6.1f}"),
    ("ttft_prefill", "prefill", 1e3, "{:7.1f}"),
    ("device_mem_util", "mem util", 100, "{:7.1f}%"),
    ("completed", "done", 1, "{:6d}"),
]
CLUSTER_COLUMNS = [
    *TABLE_COLUMNS[:5],
    ("device_hit_rate", "dev hit", 100, "{:6.1f}%"),
    ("host_hit_rate", "host hit", 100, "{:6.1f}%"),
    ("ttft_queue", "queue", 1e3, "{:8.1f}"),
    ("ttft_adapter", "adapter", 1e3, "{:7.1f}"),
    ("ttft_kv", "KV", 1e3, "{:6.1f}"),
    ("ttft_prefill", "prefill", 1e3, "{:7.1f}"),
    ("adapter_load_gib", "adapter GiB", 1, "{:11.1f}"),
    ("load_imbalance", "max/mean load", 1, "{:13.2f}"),
    ("decision_us_mean", "decision us", 1, "{:11.0f}"),
    ("completed", "done", 1, "{:6d}"),
]
"""`simulate --replicas`: one row per router; load = requests routed to a replica."""


def format_table(results: dict[str, dict], columns=TABLE_COLUMNS, label: str = "policy") -> str:
    """One row per policy (or router); times in ms. The TTFT breakdown columns sum to TTFT
    mean."""
    head = f"{label:16s}"
    for _, title, _, fmt in columns:
        width = len(fmt.format(0)) if "d" not in fmt else len(fmt.format(0))
        head += " " + title.rjust(width)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        row = f"{name:16s}"
        for key, _, scale, fmt in columns:
            v = r[key]
            row += " " + (fmt.format(int(v)) if "d}" in fmt else fmt.format(v * scale))
        lines.append(row)
    lines.append("times in ms; queue + adapter + KV + prefill = TTFT mean (the paper's "
                 "breakdown)" + ("; invalid KV: device blocks whose adapter is not on device, "
                                 "x seconds" if columns is TABLE_COLUMNS else ""))
    for name, r in results.items():
        if "learned_half_life_s" in r:
            lines.append(f"{name} learned: half-life {r['learned_half_life_s']:.1f} s; "
                         f"new-leaf floor {r['learned_leaf_reuse']:.2f} visits")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on servers and CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_ttft_cdf(results: dict[str, dict], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        xs = r["ttfts"]
        if xs:
            ax.plot([x * 1e3 for x in xs], [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    ax.set_xscale("log")
    return _save(fig, ax, path, title, "TTFT (ms)", "fraction of requests")


def plot_ttft_vs_rate(by_rate: dict[float, dict[str, dict]], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rates = sorted(by_rate)
    for name in by_rate[rates[0]]:
        ax.plot(rates, [by_rate[r][name]["ttft_mean"] * 1e3 for r in rates], marker="o",
                label=name)
    ax.axhline(500, color="grey", ls="--", lw=0.8)
    ax.set_yscale("log")
    return _save(fig, ax, path, title, "request rate (req/s)", "mean TTFT (ms)")


def plot_composition(result: dict, policy: str, path: Path) -> Path:
    """Device pool over time: adapters / cached KV / running KV / invalid KV / free."""
    plt = pyplot()
    tl = result["timeline"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    kinds = ["adapter", "kv_cached", "kv_running", "invalid_kv", "free"]
    colors = ["tab:orange", "tab:blue", "tab:green", "tab:red", "0.9"]
    ax.stackplot(tl["t"], *[tl[k] for k in kinds], labels=kinds, colors=colors)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("device blocks")
    ax.set_title(f"device pool composition: {policy}")
    ax.legend(loc="upper left", fontsize=7, ncols=5)
    ax.margins(0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_replicas_per_adapter(result: dict, router: str, path: Path) -> Path:
    """Replicas the router sent each of the most requested adapters to, per interval: a
    hot adapter spreads while it is hot and shrinks back when it cools."""
    plt = pyplot()
    samples = result["replicas_per_adapter"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, counts in samples.items():
        if name != "t":
            ax.step(samples["t"], counts, where="post", label=name)
    return _save(fig, ax, path, f"replicas serving each hot adapter: {router}",
                 "time (s)", "replicas")


# -- where a result was measured ------------------------------------------------------
def machine_info() -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": model,
            "cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None,
            "python": platform.python_version(),
            "implementation": platform.python_implementation()}


def code_version() -> dict:
    """The commit measured (and whether the tree had uncommitted changes), if in git."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fastlibra/
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                             capture_output=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, text=True,
                               capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": rev, "dirty": bool(dirty)} if rev else {}


def run_facts(torch_threads: int | None = None) -> dict:
    """The `machine` entry of every benchmark's JSON: machine facts and the commit, plus
    torch's version and thread count for benchmarks that run the model."""
    facts = {**machine_info(), **code_version()}
    if torch_threads is not None:
        import torch

        facts.update(torch=torch.__version__, torch_threads=torch_threads)
    return facts


def write_json(path: str | Path, doc: dict, log: Callable[[str], None] = print) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, default=float) + "\n")
    log(f"wrote {path}")
