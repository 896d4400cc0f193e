"""`fastlibra bench fidelity`: the profile fit recovers known parameters (ragged and padded
attention), the fit in seconds keeps the measured total, a replay's step log refits the
profile; the command runs end to end and writes the documented JSON (no timing
thresholds)."""

import json
from dataclasses import replace

import pytest

from fastlibra.bench.fidelity import Point, compare, fit_replay, fit_spec, replay_points
from fastlibra.cli import main
from fastlibra.config import LoraShape, ModelShape
from fastlibra.sim.profiles import GiB, GpuSpec, SimProfile

TINY = ModelShape("tiny", num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2,
                  intermediate_size=688, dtype_bytes=4)
LORA = LoraShape(rank=12, dtype_bytes=4)


TRUTH = GpuSpec("cpu", 64 * GiB, flops=80e9, hbm_bandwidth=4e9, pcie_bandwidth=5e9,
                nvlink_bandwidth=5e9, mfu=1.0, mbu=1.0, step_overhead_s=3e-3,
                per_seq_overhead_s=2.5e-4, lora_launch_s=3e-4)


def _synthetic(spec: GpuSpec) -> list[Point]:
    prof = SimProfile(TINY, spec, 1, LORA)
    shapes = [((16, 0),), ((64, 0),), ((256, 0),), ((512, 0),), ((32, 256),), ((64, 768),),
              ((64, 0), (64, 0))]
    pts = [Point(s, 0, 0, a, prof.step_time(list(s), 0, 0, a))
           for s in shapes for a in (0, 1)]
    for b in (1, 4, 16, 32):
        for ctx in (64, 512, 2048):
            for a in (0, 2):
                pts.append(Point((), b * ctx, b, a, prof.step_time([], b * ctx, b, a)))
    for pre, b in (((64, 0), 4), ((128, 256), 2), ((32, 0), 16)):  # mixed steps
        pts.append(Point((pre,), b * 128, b, 1, prof.step_time([pre], b * 128, b, 1)))
    return pts


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("relative", [True, False])
def test_the_fit_recovers_known_parameters(padded, relative):
    truth = replace(TRUTH, padded_attention=padded)
    points = _synthetic(truth)
    spec = fit_spec(TINY, LORA, points, pcie_bandwidth=5e9, disk_bandwidth=1e9,
                    adapter_parse_s=1e-3, relative=relative, padded_attention=padded)
    assert spec.flops == pytest.approx(truth.flops, rel=0.02)
    assert spec.hbm_bandwidth == pytest.approx(truth.hbm_bandwidth, rel=0.02)
    assert spec.step_overhead_s == pytest.approx(truth.step_overhead_s, rel=0.02)
    assert spec.per_seq_overhead_s == pytest.approx(truth.per_seq_overhead_s, rel=0.02)
    assert spec.lora_launch_s == pytest.approx(truth.lora_launch_s, rel=0.05)
    assert (spec.mfu, spec.mbu, spec.adapter_parse_s) == (1.0, 1.0, 1e-3)
    assert spec.padded_attention is padded
    assert spec.roofline_p is None  # the truth is a plain max: no smooth one fits better
    rows = compare(SimProfile(TINY, spec, 1, LORA), points)
    assert max(abs(r["rel_error"]) for r in rows) < 0.01


@pytest.mark.parametrize("p", [3.0, 1.5])
def test_the_fit_finds_a_smooth_roofline_where_compute_and_memory_add_up(p):
    truth = replace(TRUTH, roofline_p=p, padded_attention=True)
    points = _synthetic(truth)
    spec = fit_spec(TINY, LORA, points, pcie_bandwidth=5e9, disk_bandwidth=1e9,
                    adapter_parse_s=1e-3, padded_attention=True, max_splits=256)
    assert spec.roofline_p == p
    assert spec.flops == pytest.approx(truth.flops, rel=0.05)
    assert spec.hbm_bandwidth == pytest.approx(truth.hbm_bandwidth, rel=0.05)
    rows = compare(SimProfile(TINY, spec, 1, LORA), points)
    assert max(abs(r["rel_error"]) for r in rows) < 0.02
    # the max roofline alone cannot describe these steps as well
    plain = fit_spec(TINY, LORA, points, pcie_bandwidth=5e9, disk_bandwidth=1e9,
                     adapter_parse_s=1e-3, padded_attention=True, roofline_ps=(None,))
    worst = max(abs(r["rel_error"]) for r in compare(SimProfile(TINY, plain, 1, LORA), points))
    assert worst > 0.02


def _noisy(points: list[Point]) -> list[Point]:
    """Deterministic skewed noise: most steps a little fast, every fifth one much slower
    (what a shared machine does to a replay)."""
    return [replace(p, seconds=p.seconds * (1.8 if i % 5 == 0 else 0.9))
            for i, p in enumerate(points)]


def test_the_fit_in_seconds_keeps_the_measured_total():
    points = _noisy(_synthetic(TRUTH) * 3)
    total = sum(p.seconds for p in points)
    for relative, close in ((False, True), (True, False)):
        spec = fit_spec(TINY, LORA, points, pcie_bandwidth=5e9, disk_bandwidth=1e9,
                        adapter_parse_s=1e-3, relative=relative)
        fitted = sum(r["fitted_ms"] for r in compare(SimProfile(TINY, spec, 1, LORA), points))
        assert (fitted / 1e3 == pytest.approx(total, rel=0.01)) is close


def test_fit_replay_refits_on_the_step_log_and_keeps_copies():
    truth = replace(TRUTH, padded_attention=True)
    prof = SimProfile(TINY, truth, 1, LORA)
    log, t = [], 0.0
    for p in _synthetic(truth):
        log.append({"prefills": [list(x) for x in p.prefills],
                    "decode_ctx": [p.decode_ctx_sum // p.num_decodes] * p.num_decodes
                    if p.num_decodes else [], "adapters": p.num_adapters,
                    "exec_s": p.seconds, "start": t, "end": t + 1.2 * p.seconds})
        t += 2 * p.seconds
    log.append({"prefills": [[8, 0]], "decode_ctx": [], "adapters": 0, "exec_s": 1e-3})
    assert len(replay_points(log)) == len(log) - 1  # the last step never ended
    isolated = SimProfile(TINY, replace(truth, flops=1e9, disk_bandwidth=3e8), 1, LORA)
    refit, stats = fit_replay(isolated, log)
    assert refit.gpu.padded_attention
    assert (refit.gpu.pcie_bandwidth, refit.gpu.disk_bandwidth) == (5e9, 3e8)
    assert stats["steps"] == len(log) - 1
    assert stats["total_rel_error"] == pytest.approx(0.0, abs=1e-6)
    assert stats["isolated_total_rel_error"] > 1.0  # 80x slower compute
    for p in replay_points(log):
        args = (list(p.prefills), p.decode_ctx_sum, p.num_decodes, p.num_adapters)
        assert refit.step_time(*args) == pytest.approx(1.2 * prof.step_time(*args), rel=1e-3)


def test_gpu_specs_keep_todays_overheads_by_default():
    from fastlibra.sim import profiles

    g = profiles.GPUS["a100-80g"]
    assert (g.step_overhead_s, g.per_seq_overhead_s, g.lora_launch_s, g.adapter_parse_s) == (
        profiles.STEP_OVERHEAD_S, profiles.PER_SEQ_OVERHEAD_S, profiles.LORA_LAUNCH_S, 0.005)


def test_bench_fidelity_end_to_end_writes_the_json(tmp_path, capsys):
    out = tmp_path / "fid.json"
    assert main(["bench", "fidelity", "--duration", "2", "--rate", "1", "--mean-turns", "1.5",
                 "--policy", "fastlibra,vllm", "--adapters", "2", "--hidden", "64",
                 "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
                 "--vocab", "512", "--system-len", "16", "--user-len", "8", "--answer-len",
                 "4", "--think", "0.2", "--quick-profile", "--reps", "1", "--repeats", "2",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    for key in ("machine", "model", "workload", "budget", "profile", "scheduler", "policies",
                "target"):
        assert key in doc
    assert doc["scheduler"]["copy_join_s"] == pytest.approx(0.001)
    assert doc["profile"]["spec"]["name"] == "cpu"
    assert {"label", "measured_ms", "fitted_ms", "rel_error"} <= set(doc["profile"]["points"][0])
    assert set(doc["policies"]) == {"fastlibra", "vllm"}
    for v in doc["policies"].values():
        assert v["real"]["requests"] == v["sim"]["requests"] > 0
        assert v["real"]["ttft_mean_ms"] > 0 and v["sim"]["ttft_mean_ms"] > 0
        per_replay = v["real"]["ttft_mean_ms_per_replay"]
        assert len(per_replay) == 2 and v["real"]["ttft_mean_ms"] == pytest.approx(
            sum(per_replay) / 2)  # compared with the mean of the replays
        assert v["ttft_rel_error"] == pytest.approx(
            v["sim"]["ttft_mean_ms"] / v["real"]["ttft_mean_ms"] - 1)
    assert set(doc["target"]) == {"max_abs_rel_error", "worst", "met"}
    for p, v in doc["policies"].items():
        assert "ttft_rel_error" in v["sim_isolated_profile"]
        real, sim = doc["requests"][p]["real"], doc["requests"][p]["sim"]
        assert sorted(r["id"] for r in real) == sorted(2 * [r["id"] for r in sim])
        assert {"ttft", "t_queue", "t_prefill"} <= set(sim[0])
        assert doc["steps"][p] and {"prefills", "decode_ctx", "adapters", "exec_s", "start",
                                    "end", "loop_end"} <= set(doc["steps"][p][0])
    assert "worst |error|" in capsys.readouterr().out
