"""`fastlibra simulate` as a user runs it: table, JSON, plots, traces, errors."""

import json

import pytest

from fastlibra.cli import main


def test_simulate_writes_the_documented_json_and_plots(tmp_path, capsys):
    out, plots = tmp_path / "sim.json", tmp_path / "plots"
    assert main(["simulate", "--workload", "chatbot", "--duration", "40", "--rate", "1,3",
                 "--num-adapters", "5", "--policy", "fastlibra,vllm", "--device-memory",
                 "4GiB", "--output-json", str(out), "--plot", str(plots)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["policies"]) == {"fastlibra", "vllm"}
    for r in doc["policies"].values():
        for key in ("ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99", "tpot_mean",
                    "throughput_rps", "completed"):
            assert key in r
        assert r["completed"] > 0 and r["ttft_p50"] <= r["ttft_p99"]
    assert set(doc["by_rate"]) == {"1.0", "3.0"}
    assert {p.name for p in plots.iterdir()} == {
        "ttft_cdf.png", "ttft_vs_rate.png", "composition_fastlibra.png", "composition_vllm.png"}
    printed = capsys.readouterr().out
    assert "TTFT mean" in printed and "fastlibra" in printed
    # what the cost model learned, for the policy that ranks by it (vllm ranks by LRU)
    fl = doc["policies"]["fastlibra"]
    assert 1.0 <= fl["learned_kv_half_life_s"] and 1.0 <= fl["learned_adapter_half_life_s"]
    assert 0.0 <= fl["learned_leaf_reuse"] <= 1.0 and fl["learned_disk_wait"] >= 1.0
    assert "learned_kv_half_life_s" not in doc["policies"]["vllm"]
    assert "fastlibra learned: half-life" in printed and "vllm learned" not in printed


def test_simulate_replays_a_trace_file(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(
        {"arrival": i * 0.5, "adapter": f"a{i % 3}", "prompt_len": 64 + i, "output_len": 8})
        for i in range(20)) + "\n")
    out = tmp_path / "o.json"
    assert main(["simulate", "--workload", f"trace:{trace}", "--policy", "fastlibra",
                 "--output-json", str(out)]) == 0
    assert json.loads(out.read_text())["policies"]["fastlibra"]["completed"] == 20


def test_a_malformed_trace_line_is_reported_by_file_and_line(tmp_path, capsys):
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"arrival": 0, "prompt_len": 8, "output_len": 2}\n'
                     '{"arrival": 1, "prompt_len": -3, "output_len": 2}\n')
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--workload", f"trace:{trace}"])
    assert e.value.code == 2
    assert f"{trace}:2:" in capsys.readouterr().err


def test_an_impossible_setup_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--model", "llama-3-70b", "--hardware", "a100-80g"])
    assert "does not fit on 1 x a100-80g; raise --tp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--device-memory", "lots"])
    assert "cannot read 'lots' as a size" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "paper", "--host-ratio", "0"], "--host-ratio: must be positive, got '0'"),
    (["bench", "fidelity", "--repeats", "-1"], "--repeats: must be positive, got '-1'"),
    (["bench", "fidelity", "--repeats", "two"], "--repeats: expected a number, got 'two'"),
])
def test_counts_and_ratios_must_be_positive(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
