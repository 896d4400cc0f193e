"""`fastlibra bench fidelity`: does the simulator predict the real engine?

    profile      time the real `ModelRunner.forward` (+ argmax) on this machine: prefills of
                 a few lengths (with and without a cached prefix), decode batches of a few
                 sizes and contexts, with and without adapters; the arena's block copy
                 bandwidth; reading the adapter files. Fit a `GpuSpec` named `cpu`
                 (flops = effective FLOP/s, hbm_bandwidth = effective bytes/s of weight +
                 KV reads, mfu = mbu = 1, pcie = block copies, disk = adapter reads) and its
                 step / per-sequence / per-adapter overheads, so that
                 `SimProfile(tiny model, cpu).step_time` reproduces the measured step times
    real         `bench replay`'s model, adapters, workload and budgets, replayed in real time
                 per policy through the real engine (`replay_policy`)
    refit        per replay, the same step-time model fitted again on that replay's own
                 steps (batch + wall time of `LLM.step`, logged by `replay_policy`), in
                 seconds: on a shared machine a replay's steps run tens of percent away
                 from the isolated forwards, and differently in each replay
    simulated    `simulate()` on the same requests with each replay's refitted profile (and,
                 for comparison, with the isolated one), the same device and host bytes,
                 the real engine's scheduler settings (`max_batched_tokens=2048`; like
                 the real runner, a step waits for its copies before its forward pass,
                 not layer by layer) and its cost-model profile (the one the replay's
                 engine calibrated, `calibrate.py`)
    reported     per policy real vs simulated mean TTFT and their relative error
                 (target: within 20 %), both fits, and request-by-request records of both

The fit: step_time = R(a*F, b*M) + a*F_lora + b*B_lora + c_lora*adapters + c0 + c1*seqs
(F: FLOPs, M: weight + KV bytes, the same terms as `SimProfile.step_time`, with the CPU
runner's padded attention; R the roofline: max, or the smooth maximum of
`GpuSpec.roofline_p`). Under max, whether a point is compute- or memory-bound is a
threshold on F/M, so threshold splits are fitted by non-negative least squares (relative
errors for the isolated points, seconds for the replayed steps); under a smooth maximum
the ratio b/a is gridded instead. The candidate with the least error wins.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fastlibra.bench.report import run_facts, write_json
from fastlibra.config import HardwareProfile, LoraShape, ModelShape
from fastlibra.llm import scheduler_config
from fastlibra.sim.profiles import GiB, GpuSpec, SimProfile, attention_work, roofline, weight_work

TARGET_REL_ERROR = 0.20
MIN_REPLAY_STEPS = 20
"""Fewer replayed steps than this (tiny test runs) keep the isolated profile."""
BLOCK_SIZE = 16
REAL_SCHEDULER = scheduler_config()
"""What `LLM` builds its engine with (llm.py)."""


def _status(msg: str) -> None:
    print(f"[bench fidelity] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Point:
    """One measured step: the arguments of `SimProfile.step_time` and its seconds."""

    prefills: tuple[tuple[int, int], ...]
    decode_ctx_sum: int
    num_decodes: int
    num_adapters: int
    seconds: float
    label: str = ""


# -- the fit -----------------------------------------------------------------------------
def _terms(model: ModelShape, lora: LoraShape, p: Point,
           padded: bool = False) -> tuple[float, ...]:
    """(F, M, F_lora, B_lora, adapters, seqs) of `SimProfile.step_time` at tp = 1."""
    tokens = sum(n for n, _ in p.prefills) + p.num_decodes
    attn, kv_tokens = attention_work(model, p.prefills, p.decode_ctx_sum, p.num_decodes, padded)
    seqs = len(p.prefills) + p.num_decodes
    flops, streamed = weight_work(model, tokens, seqs)
    flops += attn
    mem = streamed + kv_tokens * model.kv_bytes_per_token
    lb = lora.nbytes(model)
    lflops = 2 * tokens * lb / model.dtype_bytes if p.num_adapters else 0.0
    return (flops, mem, lflops, p.num_adapters * lb, p.num_adapters, seqs)


def _nnls(cols: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares by dropping the most negative coefficient and refitting."""
    active = list(range(len(cols)))
    while active:
        x = torch.tensor([[cols[j][i] for j in active] for i in range(len(y))],
                         dtype=torch.float64)
        scale = x.abs().amax(0).clamp_min(1e-300)
        sol = torch.linalg.lstsq(x / scale, torch.tensor(y, dtype=torch.float64)[:, None],
                                 driver="gelsd").solution[:, 0] / scale
        if (sol >= 0).all():
            coef = [0.0] * len(cols)
            for j, v in zip(active, sol.tolist(), strict=True):
                coef[j] = v
            return coef
        active.pop(int(sol.argmin()))
    return [0.0] * len(cols)


def _predict(coef: list[float], t: tuple[float, ...], p: float | None = None) -> float:
    a, b, c0, c1, c2 = coef
    f, m, lf, lb, nad, nseq = t
    return roofline(a * f, b * m, p) + a * lf + b * lb + c2 * nad + c0 + c1 * nseq


ROOFLINE_PS = (None, 4.0, 3.0, 2.0, 1.5, 1.25)
"""Candidate `GpuSpec.roofline_p` values (None = max) that `fit_spec` tries."""
REFINE_STEPS = 24
GOLDEN = (math.sqrt(5) - 1) / 2


def fit_spec(model: ModelShape, lora: LoraShape, points: list[Point], *,
             pcie_bandwidth: float, disk_bandwidth: float, adapter_parse_s: float,
             memory_bytes: int = 64 * GiB, name: str = "cpu", relative: bool = True,
             max_splits: int = 64, padded_attention: bool = False,
             roofline_ps: tuple[float | None, ...] = ROOFLINE_PS) -> GpuSpec:
    """The `GpuSpec` (mfu = mbu = 1) whose `SimProfile.step_time` best matches `points`
    in relative error, or in seconds (`relative=False`: the fit's total equals the
    measured total, which is what queueing and mean TTFT follow when the steps are noisy).
    At most `max_splits` compute/memory thresholds are tried (quantiles of F/M).

    With the max roofline a threshold split makes the model linear in its coefficients.
    With a finite p it is linear once the ratio k = b / a is fixed, so each p is fitted
    over the same grid of ratios (the threshold of a split is that ratio)."""
    if len(points) < 5:
        raise ValueError("the profile fit needs at least 5 measured steps")
    terms = [_terms(model, lora, p, padded_attention) for p in points]
    ys = [p.seconds for p in points]
    ratio = sorted({t[0] / t[1] for t in terms})
    if len(ratio) > max_splits:
        ratio = [ratio[round(i * (len(ratio) - 1) / (max_splits - 1))] for i in range(max_splits)]
    thresholds = [0.0] + [r * (1 + 1e-9) for r in ratio]  # compute-bound iff F/M >= thr
    weight = [1 / y if relative else 1.0 for y in ys]
    wy = [y * w for y, w in zip(ys, weight, strict=True)]

    def solve(rows: list[tuple[float, ...]]) -> list[float]:
        cols = [[r[j] * w for r, w in zip(rows, weight, strict=True)]
                for j in range(len(rows[0]))]
        return _nnls(cols, wy)

    def error(coef: list[float], p: float | None) -> float:
        return sum(((_predict(coef, t, p) - y) * w) ** 2
                   for t, y, w in zip(terms, ys, weight, strict=True))

    candidates: list[tuple[list[float], float | None]] = []
    if None in roofline_ps:
        for thr in thresholds:
            ind = [t[0] / t[1] >= thr for t in terms]
            coef = solve([(t[0] * c + t[2], t[1] * (not c) + t[3], 1.0, t[5], t[4])
                          for t, c in zip(terms, ind, strict=True)])
            if coef[0] <= 0:
                continue
            if coef[1] <= 0:  # memory never binds: the largest b that keeps it so
                coef[1] = min(coef[0] * t[0] / t[1] for t in terms)
            candidates.append((coef, None))
    for p in (q for q in roofline_ps if q is not None):
        def at(k: float, p: float = p) -> tuple[float, tuple[list[float], float]]:
            """Best fit with b = k * a, and its error (infinite without a compute term)."""
            a, c0, c1, c2 = solve([(roofline(t[0], k * t[1], p) + t[2] + k * t[3], 1.0,
                                    t[5], t[4]) for t in terms])
            cand = ([a, k * a, c0, c1, c2], p)
            return (error(*cand) if a > 0 else math.inf), cand

        grid = [at(k) for k in ratio]
        i = min(range(len(grid)), key=lambda j: grid[j][0])
        if math.isinf(grid[i][0]):
            continue
        # the grid's ratios are the points' F/M, not the machine's b/a: refine between
        # the neighbours of the best one (golden section on log k)
        lo = math.log(ratio[max(0, i - 1)])
        hi = math.log(ratio[min(len(ratio) - 1, i + 1)])
        best = grid[i]
        for _ in range(REFINE_STEPS):
            m1, m2 = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
            f1, f2 = at(math.exp(m1)), at(math.exp(m2))
            best = min(best, f1, f2, key=lambda c: c[0])
            if f1[0] <= f2[0]:
                hi = m2
            else:
                lo = m1
        candidates.append(best[1])
    if not candidates:
        raise ValueError("no compute term fits the measured steps")
    (a, b, c0, c1, c2), p = min(candidates, key=lambda c: error(*c))
    return GpuSpec(name, memory_bytes, flops=1 / a, hbm_bandwidth=1 / b,
                   pcie_bandwidth=pcie_bandwidth, nvlink_bandwidth=pcie_bandwidth,
                   disk_bandwidth=disk_bandwidth, mfu=1.0, mbu=1.0, step_overhead_s=c0,
                   per_seq_overhead_s=c1, lora_launch_s=c2, adapter_parse_s=adapter_parse_s,
                   padded_attention=padded_attention, roofline_p=p)


def _roofline_name(spec: GpuSpec) -> str:
    return "max roofline" if spec.roofline_p is None else f"roofline p={spec.roofline_p:g}"


def compare(profile: SimProfile, points: list[Point]) -> list[dict]:
    """Measured against `profile.step_time`, point by point."""
    out = []
    for p in points:
        fit = profile.step_time(list(p.prefills), p.decode_ctx_sum, p.num_decodes,
                                p.num_adapters)
        out.append({"label": p.label, "measured_ms": 1e3 * p.seconds, "fitted_ms": 1e3 * fit,
                    "rel_error": fit / p.seconds - 1})
    return out


# -- measuring the real runner -------------------------------------------------------------
def _round_robin_times(steps: list, reps: int) -> list[float]:
    """Median seconds of each step, timed round-robin (every rep visits every step once):
    a slow minute of a shared machine then slows every point alike instead of skewing
    the few measured during it, which the fit would read as a shape effect."""
    for step in steps:
        step()  # warm-up
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(reps):
        for i, step in enumerate(steps):
            t = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def _plan(quick: bool) -> list[tuple[str, list[tuple[int, int, int]], int]]:
    """(label, [(new tokens, prefix, adapter index or -1)], ...) per point; a seq with one
    new token and prefix > 0 is a decode."""
    pre = [16, 64, 256] if quick else [16, 64, 128, 256, 512]
    plan: list[tuple[str, list[tuple[int, int, int]], int]] = []
    for n in pre:
        plan.append((f"prefill {n}", [(n, 0, -1)], 0))
    for n, q in ([(32, 256)] if quick else [(32, 256), (128, 384), (64, 768)]):
        plan.append((f"prefill {n} after {q} cached", [(n, q, -1)], 0))
    plan.append(("prefill 64, adapter", [(64, 0, 0)], 0))
    plan.append(("prefill 2x64, 2 adapters", [(64, 0, 0), (64, 0, 1)], 0))
    if not quick:
        plan.append(("prefill 256, adapter", [(256, 0, 0)], 0))
    batches = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 32]
    ctxs = [64, 256] if quick else [64, 256, 512]
    for b in batches:
        for c in ctxs:
            plan.append((f"decode b={b} ctx={c}", [(1, c, -1)] * b, 0))
    plan.append(("decode b=4 ctx=128, 2 adapters", [(1, 128, i % 2) for i in range(4)], 0))
    plan.append(("decode b=8 ctx=128, 4 adapters", [(1, 128, i % 4) for i in range(8)], 0))
    plan.append(("prefill 64 + decode b=4 ctx=128", [(64, 0, -1)] + [(1, 128, -1)] * 4, 0))
    # what a multi-turn chat runs most: decodes of unequal contexts (padded, masked), a
    # follow-up turn's short prefill after its cached history, and the two mixed
    plan.append(("decode b=2 ctx=96,320, 2 adapters", [(1, 96, 0), (1, 320, 1)], 0))
    plan.append(("decode b=3 ctx=64,192,448", [(1, 64, -1), (1, 192, 0), (1, 448, -1)], 0))
    plan.append(("prefill 40 after 160 cached, adapter", [(40, 160, 0)], 0))
    plan.append(("prefill 40 after 160 + decode ctx=256",
                 [(40, 160, 0), (1, 256, 1)], 0))
    return plan


WAKE_POINTS = ("prefill 32 after 256 cached", "decode b=1 ctx=64", "decode b=4 ctx=256")
"""Steps timed again after a pause: the replay's first-token steps mostly start an idle
engine (a request arrives, its prefill runs alone), and on a CPU that step is slower."""
IDLE_PAUSE_S = 0.15
"""The pause: about the median idle gap before a replayed first-token step."""


def _idle_wake(step, warm_s: float, reps: int) -> float:
    """Extra seconds of `step` right after an `IDLE_PAUSE_S` pause, against back to back."""
    cold = []
    for _ in range(reps):
        time.sleep(IDLE_PAUSE_S)
        t = time.perf_counter()
        step()
        cold.append(time.perf_counter() - t)
    return max(0.0, statistics.median(cold) - warm_s)


def measure_engine_overhead(model_dir: str | Path, adapter_dirs: dict[str, Path], *,
                            max_rank: int = 16, requests: int = 8, tokens: int = 16) -> float:
    """Seconds per step the real engine spends outside the model (scheduling, cache
    bookkeeping, output tracking): `LLM.step` wall time minus the executor's measured
    forward + sampling, over a small batch of adapter requests."""
    from fastlibra.llm import LLM
    from fastlibra.model.sampling import SamplingParams

    llm = LLM(model_dir, {k: str(v) for k, v in adapter_dirs.items()}, dtype="float32",
              device="cpu", block_size=BLOCK_SIZE, max_lora_rank=max_rank)
    inner = llm.executor.execute
    spent = [0.0]

    def execute(batch, now):
        out = inner(batch, now)
        spent[0] += out.duration
        return out

    llm.executor.execute = execute
    names = sorted(adapter_dirs) or [None]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    gen = torch.Generator().manual_seed(1)
    for i in range(requests):
        llm.add_request(torch.randint(3, llm.model_config.vocab_size, (48,),
                                      generator=gen).tolist(), names[i % len(names)], params)
    wall, steps = 0.0, 0
    llm.step()  # warm-up (admission, first prefill)
    spent[0] = 0.0
    while llm.has_unfinished:
        t = time.perf_counter()
        llm.step()
        wall += time.perf_counter() - t
        steps += 1
    return max(0.0, (wall - spent[0]) / max(1, steps))


def measure_cpu_profile(model_dir: str | Path, adapter_dirs: dict[str, Path], *,
                        reps: int = 5, quick: bool = False, max_rank: int = 16,
                        engine_overhead: bool = True, verbose: bool = True) -> dict:
    """Time the real runner on this machine and fit `GpuSpec('cpu')` to it.

    Returns {"spec": GpuSpec, "profile": SimProfile, "points": [Point], "comparison",
    "copy_bandwidth", "disk", "adapter_bytes"}; `adapter_bytes` is what the real engine
    books for each adapter (its arena blocks), so the simulated pools fill the same way."""
    from fastlibra.model import KVCache, ModelRunner, SeqInput, load_adapter, load_model
    from fastlibra.model.lora import ArenaLayout

    weights = load_model(model_dir, dtype=torch.float32, device="cpu")
    cfg = weights.config
    shape = cfg.shape(dtype_bytes=4)
    plan = _plan(quick)
    per_seq = [[-(-(n + q + 1) // BLOCK_SIZE) for n, q, _ in seqs] for _, seqs, _ in plan]
    blocks = max(max(sum(x) for x in per_seq), 64)
    runner = ModelRunner(weights, KVCache(cfg, blocks, BLOCK_SIZE, torch.float32, "cpu"))
    names = sorted(adapter_dirs)
    disk: list[tuple[int, float]] = []
    ranks = []
    booked: dict[str, int] = {}
    for name in names:
        t = time.perf_counter()
        ad = load_adapter(adapter_dirs[name], cfg, max_rank=max_rank, name=name,
                          dtype=torch.float32, device="cpu")
        disk.append((ad.nbytes, time.perf_counter() - t))
        ranks.append(ad.rank)
        booked[name] = ArenaLayout(ad, runner.kv.block_elems).num_blocks \
            * runner.kv.block_bytes
        runner.add_adapter(ad)
    gen = torch.Generator().manual_seed(0)
    steps = []
    for seqs, sizes in zip((p[1] for p in plan), per_seq, strict=True):
        inputs, start = [], 0
        for (n, q, ai), nb in zip(seqs, sizes, strict=True):
            toks = torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist()
            inputs.append(SeqInput(toks, q, list(range(start, start + nb)),
                                   names[ai % len(names)] if ai >= 0 and names else None))
            start += nb

        def step(inputs=inputs) -> None:
            runner.forward(inputs).argmax(-1).tolist()

        steps.append(step)
    timings = _round_robin_times(steps, reps)
    points: list[Point] = []
    wakes: list[float] = []
    for (label, seqs, _), step, secs in zip(plan, steps, timings, strict=True):
        if label in WAKE_POINTS:
            wakes.append(_idle_wake(step, secs, reps))
        pre = tuple((n, q) for n, q, _ in seqs if not (n == 1 and q > 0))
        dec = [(n, q) for n, q, _ in seqs if n == 1 and q > 0]
        used = {ai for _, _, ai in seqs if ai >= 0}
        points.append(Point(pre, sum(q for _, q in dec), len(dec), len(used), secs, label))

    # the arena's block copies, as ArenaMover does them
    data = runner.kv.data
    host = torch.empty_like(data)
    n = min(64, data.shape[0])
    idx = torch.arange(n)

    def h2d() -> None:
        data[idx] = host[idx].to(data.device)

    def d2h() -> None:
        host[idx] = data[idx].cpu()

    nbytes = n * runner.kv.block_bytes
    copy_bw = nbytes / statistics.fmean(_round_robin_times([h2d, d2h], reps))

    # adapter reads: parse + bytes / bandwidth over the adapters' sizes (re-read, warm)
    for name in names[:4]:
        t = time.perf_counter()
        ad = load_adapter(adapter_dirs[name], cfg, max_rank=max_rank, name=name,
                          dtype=torch.float32, device="cpu")
        disk.append((ad.nbytes, time.perf_counter() - t))
    sizes = {b for b, _ in disk}
    if len(sizes) > 1:
        coef = _nnls([[1.0] * len(disk), [float(b) for b, _ in disk]], [s for _, s in disk])
        parse, per_byte = coef
    else:
        parse, per_byte = min(s for _, s in disk), 0.0
    disk_bw = 1 / per_byte if per_byte > 0 else 1e12
    rank = round(statistics.fmean(ranks)) if ranks else 16
    lora = LoraShape(rank=rank, dtype_bytes=4)
    spec = fit_spec(shape, lora, points, pcie_bandwidth=copy_bw, disk_bandwidth=disk_bw,
                    adapter_parse_s=parse, padded_attention=True)
    engine_s = measure_engine_overhead(model_dir, adapter_dirs, max_rank=max_rank) \
        if engine_overhead else 0.0
    model_spec = spec
    wake = statistics.median(wakes) if wakes else 0.0
    spec = replace(spec, step_overhead_s=spec.step_overhead_s + engine_s, idle_wake_s=wake)
    profile = SimProfile(shape, spec, 1, lora)
    rows = compare(SimProfile(shape, model_spec, 1, lora), points)
    if verbose:
        _status(f"fitted {spec.name}: {spec.flops / 1e9:.2f} GFLOP/s, "
                f"{spec.hbm_bandwidth / 1e9:.2f} GB/s reads, {_roofline_name(spec)}, "
                f"step {1e3 * spec.step_overhead_s:.3f}"
                f" ms + {1e3 * spec.per_seq_overhead_s:.3f} ms/seq + "
                f"{1e3 * spec.lora_launch_s:.3f} ms/adapter; copies {copy_bw / 1e9:.2f} GB/s, "
                f"adapter read {1e3 * parse:.2f} ms + {disk_bw / 1e9:.2f} GB/s; engine "
                f"overhead outside the model {1e3 * engine_s:.3f} ms/step (included above); "
                f"first step after {1e3 * IDLE_PAUSE_S:.0f} ms idle +{1e3 * wake:.2f} ms")
        for r in rows:
            _status(f"  {r['label']:<34} measured {r['measured_ms']:8.3f} ms  fitted "
                    f"{r['fitted_ms']:8.3f} ms  ({r['rel_error']:+.1%})")
    return {"spec": spec, "profile": profile, "points": points, "comparison": rows,
            "copy_bandwidth": copy_bw, "disk": {"parse_s": parse, "bandwidth": disk_bw},
            "adapter_bytes": booked,
            "engine_overhead_s": engine_s, "idle_wake_s": wake}


def replay_points(step_log: list[dict]) -> list[Point]:
    """One point per replayed step: its batch and the wall time of `LLM.step`, so the
    engine's bookkeeping around the forward pass (and any copy wait inside it) is part of
    the step, as the simulator charges it."""
    return [Point(tuple(tuple(x) for x in s["prefills"]), sum(s["decode_ctx"]),
                  len(s["decode_ctx"]), s["adapters"], s["end"] - s["start"], "replay")
            for s in step_log if "end" in s]


def fit_replay(isolated: SimProfile, step_log: list[dict]) -> tuple[SimProfile, dict]:
    """The step-time model refitted on one replay's own steps (in seconds, so the fitted
    total is the measured total): the machine as it was during that replay, which on a
    shared box differs from the quiet isolated forwards by tens of percent. Copies and
    adapter reads keep the isolated measurements. Returns the profile and fit statistics."""
    points = replay_points(step_log)
    g = isolated.gpu
    spec = fit_spec(isolated.model, isolated.lora, points, pcie_bandwidth=g.pcie_bandwidth,
                    disk_bandwidth=g.disk_bandwidth, adapter_parse_s=g.adapter_parse_s,
                    relative=False, padded_attention=g.padded_attention)
    profile = SimProfile(isolated.model, spec, 1, isolated.lora)
    rows = compare(profile, points)
    measured = sum(r["measured_ms"] for r in rows)
    return profile, {"spec": asdict(spec), "steps": len(points),
                     "mean_abs_rel_error": statistics.fmean(abs(r["rel_error"]) for r in rows),
                     "total_rel_error": sum(r["fitted_ms"] for r in rows) / measured - 1,
                     "isolated_total_rel_error": sum(
                         1e3 * isolated.step_time(list(p.prefills), p.decode_ctx_sum,
                                                  p.num_decodes, p.num_adapters)
                         for p in points) / measured - 1}


# -- the benchmark -----------------------------------------------------------------------
def _sim_setup(profile: SimProfile, device: int, host: int, adapter_bytes: dict[str, int],
               hardware: HardwareProfile):
    """`SimSetup` with the real engine's scheduler, cost-model profile (`hardware`: what
    the replay's engine calibrated, at the end of the run) and adapter sizes (with one mean
    rank for all, rank-16 and rank-8 adapters would pack into vllm's static share
    differently than they do for real, and its queueing for a slot with them)."""
    from fastlibra.sim.simulate import SimSetup

    class RealEngineSetup(SimSetup):
        def cache_config(self):
            return replace(super().cache_config(), hardware=hardware)

    return RealEngineSetup(profile, device_memory=device, host_memory=host,
                           block_size=BLOCK_SIZE, scheduler=REAL_SCHEDULER,
                           adapter_bytes=adapter_bytes)


def run_fidelity(args) -> int:
    from fastlibra.bench.replay import (
        BLOCK_SIZE as REPLAY_BLOCK,
    )
    from fastlibra.bench.replay import (
        CONV_TOKENS,
        _adapter_bytes,
        _kv_bytes_per_token,
        build_assets,
        mean_of_replays,
        replay_policy,
        workload_spec,
    )
    from fastlibra.sim.simulate import simulate
    from fastlibra.workloads import iter_turns, make_workload

    assert REPLAY_BLOCK == BLOCK_SIZE
    if (args.device, args.dtype) != ("cpu", "float32"):
        raise ValueError("bench fidelity measures its `cpu` profile on the CPU in float32; "
                         f"--device {args.device} --dtype {args.dtype} is for bench replay")
    torch.set_num_threads(args.threads)
    firsts = make_workload(workload_spec(args))
    turns = list(iter_turns(firsts))
    if not turns:
        raise ValueError("the workload is empty; raise --rate or --duration")
    _status(f"torch {torch.__version__}, {args.threads} thread(s); workload {len(firsts)} "
            f"sessions, {len(turns)} turns over {args.duration:.0f} s")
    sim: dict[str, dict] = {}
    step_logs: dict[str, list[dict]] = {p: [] for p in args.policy}
    sim_records: dict[str, list[dict]] = {p: [] for p in args.policy}
    with tempfile.TemporaryDirectory(prefix="fastlibra-bench-fidelity-") as tmp:
        base, adapters = build_assets(Path(tmp), args)
        kv_tok = _kv_bytes_per_token(args)
        ad_bytes = _adapter_bytes(adapters, args)
        device = args.device_memory or ad_bytes + args.conversations * CONV_TOKENS * kv_tok
        host = args.host_memory or 8 * device
        _status("measuring the CPU profile")
        prof = measure_cpu_profile(base, adapters, reps=args.reps, quick=args.quick_profile,
                                   max_rank=max(args.rank_hi, args.rank_lo))
        runs: dict[str, list[dict]] = {p: [] for p in args.policy}
        for rep in range(args.repeats):  # policies interleaved, so drift hits all alike
            for policy in args.policy:
                _status(f"replaying through {policy} ({rep + 1}/{args.repeats}; real time, "
                        f"~{args.duration:.0f} s + tail)")
                runs[policy].append(replay_policy(
                    policy, base, adapters, [x.fresh_copy() for x in firsts], args, device,
                    host, step_log=step_logs[policy]))
        real = {p: mean_of_replays(rs) for p, rs in runs.items()}
    isolated: dict[str, dict] = {}
    fits: dict[str, dict] = {}
    for policy in args.policy:
        hardware = HardwareProfile(name="replay", **real[policy]["hardware"])
        isolated[policy] = simulate(policy, firsts, _sim_setup(prof["profile"], device, host,
                                                                prof["adapter_bytes"], hardware))
        if len(replay_points(step_logs[policy])) >= MIN_REPLAY_STEPS:
            profile, fits[policy] = fit_replay(prof["profile"], step_logs[policy])
            f, g = fits[policy], profile.gpu
            _status(f"{policy}: refitted on {f['steps']} replayed steps: {g.flops / 1e9:.2f} "
                    f"GFLOP/s, {g.hbm_bandwidth / 1e9:.2f} GB/s, {_roofline_name(g)}, step "
                    f"{1e3 * g.step_overhead_s:.3f} ms + {1e3 * g.per_seq_overhead_s:.3f} "
                    f"ms/seq + {1e3 * g.lora_launch_s:.3f} ms/adapter; mean |error| "
                    f"{f['mean_abs_rel_error']:.1%}, total {f['total_rel_error']:+.1%} "
                    f"(isolated profile: total {f['isolated_total_rel_error']:+.1%})")
        else:
            profile = prof["profile"]
            _status(f"{policy}: too few replayed steps to refit; the isolated profile is used")
        sim[policy] = simulate(policy, firsts,
                               _sim_setup(profile, device, host, prof["adapter_bytes"],
                                          hardware),
                               records=sim_records[policy])
    policies = {}
    for p in args.policy:
        r, s = real[p], sim[p]
        real_ms, sim_ms = r["ttft_mean_ms"], 1e3 * s["ttft_mean"]
        iso_ms = 1e3 * isolated[p]["ttft_mean"]
        policies[p] = {
            "replay_fit": fits.get(p),
            "sim_isolated_profile": {"ttft_mean_ms": iso_ms,
                                     "tpot_mean_ms": 1e3 * isolated[p]["tpot_mean"],
                                     "ttft_rel_error": iso_ms / real_ms - 1 if real_ms
                                     else float("nan")},
            "real": {"requests": r["requests"], "ttft_mean_ms": real_ms,
                     "ttft_mean_ms_per_replay": r["ttft_mean_ms_per_replay"],
                     "ttft_p50_ms": r["ttft_p50_ms"], "ttft_p99_ms": r["ttft_p99_ms"],
                     "tpot_mean_ms": r["tpot_mean_ms"], "device_hit_rate": r["device_hit_rate"],
                     "host_hit_rate": r["host_hit_rate"], "steps": r["steps"],
                     "mean_step_ms": r["mean_step_ms"], "wall_s": r["wall_s"]},
            "sim": {"requests": s["completed"], "ttft_mean_ms": sim_ms,
                    "ttft_p50_ms": 1e3 * s["ttft_p50"], "ttft_p99_ms": 1e3 * s["ttft_p99"],
                    "tpot_mean_ms": 1e3 * s["tpot_mean"], "device_hit_rate": s["device_hit_rate"],
                    "host_hit_rate": s["host_hit_rate"]},
            "ttft_rel_error": sim_ms / real_ms - 1 if real_ms else float("nan"),
        }
    worst = max(abs(v["ttft_rel_error"]) for v in policies.values())
    spec = prof["spec"]
    out = {
        "machine": run_facts(args.threads),
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "kv_heads": args.kv_heads, "intermediate": args.intermediate,
                  "vocab": args.vocab, "dtype": "float32", "adapters": args.adapters},
        "workload": {"generator": "chatbot", "sessions": len(firsts), "turns": len(turns),
                     "rate": args.rate, "duration_s": args.duration, "think_mean_s": args.think,
                     "seed": args.seed},
        "budget": {"device_bytes": device, "host_bytes": host, "adapter_bytes": ad_bytes,
                   "kv_bytes_per_token": kv_tok, "block_size": BLOCK_SIZE},
        "profile": {"spec": asdict(spec), "engine_overhead_s": prof["engine_overhead_s"],
                    "lora_rank": prof["profile"].lora.rank,
                    "points": prof["comparison"],
                    "fit_mean_abs_rel_error": statistics.fmean(
                        abs(r["rel_error"]) for r in prof["comparison"])},
        "scheduler": asdict(REAL_SCHEDULER),
        "policies": policies,
        "target": {"max_abs_rel_error": TARGET_REL_ERROR, "worst": worst,
                   "met": worst <= TARGET_REL_ERROR},
    }
    print(f"{'policy':<10} {'reqs':>5} {'real TTFT':>10} {'sim TTFT':>10} {'error':>8} "
          f"{'isolated fit':>13} {'real dev hit':>12} {'sim dev hit':>11}")
    for p, v in policies.items():
        iso = v["sim_isolated_profile"]
        print(f"{p:<10} {v['real']['requests']:>5} {v['real']['ttft_mean_ms']:>8.1f}ms "
              f"{v['sim']['ttft_mean_ms']:>8.1f}ms {v['ttft_rel_error']:>+8.1%} "
              f"{iso['ttft_mean_ms']:>5.1f} {iso['ttft_rel_error']:>+6.1%} "
              f"{v['real']['device_hit_rate']:>12.1%} {v['sim']['device_hit_rate']:>11.1%}")
    print(f"worst |error| {worst:.1%} (target <= {TARGET_REL_ERROR:.0%}: "
          f"{'met' if out['target']['met'] else 'NOT met'})")
    if args.json:
        out["requests"] = {p: {"real": real[p]["requests_detail"], "sim": sim_records[p]}
                           for p in args.policy}  # real: every replay's, one after another
        out["steps"] = step_logs
        write_json(args.json, out, _status)
    return 0
