"""`fastlibra bench fidelity`: the profile fit recovers known parameters; the command runs
end to end and writes the documented JSON (no timing thresholds)."""

import json

import pytest

from fastlibra.cli import main
from fastlibra.config import LoraShape, ModelShape
from fastlibra.sim.fidelity import Point, compare, fit_spec
from fastlibra.sim.profiles import GiB, GpuSpec, SimProfile

TINY = ModelShape("tiny", num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2,
                  intermediate_size=688, dtype_bytes=4)
LORA = LoraShape(rank=12, dtype_bytes=4)


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
    return pts


def test_the_fit_recovers_known_parameters():
    truth = GpuSpec("cpu", 64 * GiB, flops=80e9, hbm_bandwidth=4e9, pcie_bandwidth=5e9,
                    nvlink_bandwidth=5e9, mfu=1.0, mbu=1.0, step_overhead_s=3e-3,
                    per_seq_overhead_s=2.5e-4, lora_launch_s=3e-4)
    points = _synthetic(truth)
    spec = fit_spec(TINY, LORA, points, pcie_bandwidth=5e9, disk_bandwidth=1e9,
                    adapter_parse_s=1e-3)
    assert spec.flops == pytest.approx(truth.flops, rel=0.02)
    assert spec.hbm_bandwidth == pytest.approx(truth.hbm_bandwidth, rel=0.02)
    assert spec.step_overhead_s == pytest.approx(truth.step_overhead_s, rel=0.02)
    assert spec.per_seq_overhead_s == pytest.approx(truth.per_seq_overhead_s, rel=0.02)
    assert spec.lora_launch_s == pytest.approx(truth.lora_launch_s, rel=0.05)
    assert (spec.mfu, spec.mbu, spec.adapter_parse_s) == (1.0, 1.0, 1e-3)
    rows = compare(SimProfile(TINY, spec, 1, LORA), points)
    assert max(abs(r["rel_error"]) for r in rows) < 0.01


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
                 "4", "--think", "0.2", "--quick-profile", "--reps", "1",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    for key in ("machine", "model", "workload", "budget", "profile", "scheduler", "policies",
                "target"):
        assert key in doc
    assert doc["scheduler"]["layerwise_copies"] is False
    assert doc["profile"]["spec"]["name"] == "cpu"
    assert {"label", "measured_ms", "fitted_ms", "rel_error"} <= set(doc["profile"]["points"][0])
    assert set(doc["policies"]) == {"fastlibra", "vllm"}
    for v in doc["policies"].values():
        assert v["real"]["requests"] == v["sim"]["requests"] > 0
        assert v["real"]["ttft_mean_ms"] > 0 and v["sim"]["ttft_mean_ms"] > 0
        assert "ttft_rel_error" in v
    assert set(doc["target"]) == {"max_abs_rel_error", "worst", "met"}
    assert "worst |error|" in capsys.readouterr().out
