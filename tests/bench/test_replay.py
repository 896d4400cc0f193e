"""`fastlibra bench replay` end to end at a tiny size: a few seconds of real-time replay
through two policies; the JSON has every key and the measurements are positive and
finite (no timing thresholds: this box is shared)."""

from __future__ import annotations

import json
import math

import pytest

from fastlibra.cli import main

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--intermediate", "128", "--vocab", "256", "--adapters", "3", "--rank-hi", "8",
        "--rank-lo", "4", "--system-len", "16", "--user-len", "8", "--answer-len", "4",
        "--duration", "2", "--rate", "3", "--think", "0.2", "--mean-turns", "2",
        "--conversations", "2", "--threads", "1", "--seed", "1"]


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_bench_replay_two_policies(tmp_path, capsys):
    out = tmp_path / "replay.json"
    assert main(["bench", "replay", *TINY, "--policy", "fastlibra,vllm",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "fastlibra mean TTFT vs vllm" in table

    res = json.loads(out.read_text())
    assert {"machine", "model", "workload", "budget", "policies", "ttft_reduction_vs",
            "target", "requests"} <= set(res)
    assert res["machine"]["torch_threads"] == 1
    assert res["model"]["hidden"] == 64 and res["model"]["adapters"] == 3
    turns = res["workload"]["turns"]
    assert turns >= res["workload"]["sessions"] >= 1
    assert positive(res["budget"]["device_bytes"])
    assert res["budget"]["host_bytes"] > res["budget"]["device_bytes"]
    assert set(res["policies"]) == {"fastlibra", "vllm"}
    for p, r in res["policies"].items():
        assert r["requests"] == turns, p  # every turn, follow-ups included, was served
        for key in ("ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "wall_s", "mean_step_ms",
                    "prompt_tokens"):
            assert positive(r[key]), (p, key, r)
        assert r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        for key in ("device_hit_rate", "host_hit_rate"):
            assert 0.0 <= r[key] <= 1.0, (p, key)
        assert 0 <= r["invalid_kv_blocks_mean"] <= r["invalid_kv_blocks_peak"]
        assert set(r["bytes_moved"]) == {"swap_out", "swap_in", "load", "load_host"}
        assert min(r["bytes_moved"].values()) >= 0
        # the profile the engine's cost model priced misses with at the end (calibrated)
        assert positive(r["hardware"]["h2d_bandwidth"]) and r["hardware"]["adapter_parse_s"] == 0
        detail = res["requests"][p]
        assert len(detail) == turns
        for d in detail:
            assert positive(d["ttft"])
            assert d["finish_reason"] == "length"
        # follow-up turns extend what the model generated, so the reusing policies hit
    assert res["policies"]["fastlibra"]["device_hit_rate"] > 0
    assert res["policies"]["fastlibra"]["invalid_kv_blocks_peak"] == 0  # the dependency rule
    assert math.isfinite(res["ttft_reduction_vs"]["vllm"])
    assert isinstance(res["target"]["met"], bool)


def test_repeated_replays_report_their_mean():
    from fastlibra.bench.replay import mean_of_replays

    a = {"policy": "vllm", "requests": 3, "ttft_mean_ms": 10.0, "adapter_disk_loads": 2,
         "bytes_moved": {"load": 100, "swap_in": 0}, "requests_detail": [{"id": "x"}]}
    b = {"policy": "vllm", "requests": 3, "ttft_mean_ms": 30.0, "adapter_disk_loads": 3,
         "bytes_moved": {"load": 300, "swap_in": 10}, "requests_detail": [{"id": "x"}]}
    m = mean_of_replays([a, b])
    assert m["policy"] == "vllm" and m["requests"] == 3
    assert m["ttft_mean_ms"] == 20.0 and m["adapter_disk_loads"] == 2.5
    assert m["bytes_moved"] == {"load": 200, "swap_in": 5}
    assert m["ttft_mean_ms_per_replay"] == [10.0, 30.0]
    assert m["requests_detail"] == [{"id": "x"}, {"id": "x"}]
    assert mean_of_replays([a]) | {"ttft_mean_ms_per_replay": None} == a | {
        "ttft_mean_ms_per_replay": None}  # one replay is reported as it was


def test_bench_replay_repeats_interleave_policies(tmp_path, capsys):
    out = tmp_path / "replay.json"
    assert main(["bench", "replay", *TINY, "--policy", "fastlibra,vllm", "--repeats", "2",
                 "--json", str(out)]) == 0
    err = capsys.readouterr().err
    order = [line.split("replaying through ")[1].split()[0] for line in err.splitlines()
             if "replaying through" in line]
    assert order == ["fastlibra", "vllm", "fastlibra", "vllm"]
    res = json.loads(out.read_text())
    for p, r in res["policies"].items():
        assert len(r["ttft_mean_ms_per_replay"]) == 2
        assert len(res["requests"][p]) == 2 * res["workload"]["turns"]


def test_bench_replay_in_bfloat16_budgets_bf16_bytes(tmp_path):
    """`--dtype bfloat16`: the engine, its KV and its adapters run in bf16, and the
    default device budget (adapters + conversations of KV) is counted in bf16 bytes."""
    budgets = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["bench", "replay", *TINY, "--policy", "fastlibra", "--dtype", dtype,
                     "--json", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["model"]["dtype"] == dtype and res["model"]["device"] == "cpu"
        assert res["policies"]["fastlibra"]["requests"] == res["workload"]["turns"]
        budgets[dtype] = res["budget"]["device_bytes"]
    assert budgets["bfloat16"] * 2 == budgets["float32"]


def test_bench_fidelity_refuses_a_device_or_dtype_it_cannot_profile(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "fidelity", *TINY, "--dtype", "bfloat16"])
    assert exit_.value.code == 2
    assert "measures its `cpu` profile on the CPU in float32" in capsys.readouterr().err


def test_bench_replay_sweeps_rates_and_reports_peak_loads(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert main(["bench", "replay", *TINY, "--rates", "1,4", "--policy", "fastlibra,vllm",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rates"] == [1.0, 4.0]
    for policy in ("fastlibra", "vllm"):
        assert set(res["ttft_mean_s"][policy]) == {"1.0", "4.0"}
        assert all(positive(t) for t in res["ttft_mean_s"][policy].values())
        peak = res["peak_load"][policy]
        # a tiny model answers well under 500 ms at both rates: censored above the top rate
        assert (peak["rate"], peak["censored"]) == (4.0, "above")
    assert "fastlibra peak load / vllm: 1.00x" in capsys.readouterr().out
