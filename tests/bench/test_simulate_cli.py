"""`fastlibra simulate` as a user runs it: table, JSON, plots, traces, errors."""

import json

import pytest
from simfixtures import a100_file, llama_2_7b_dir

from fastlibra.bench.simulate import named_profile
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
    assert 1.0 <= fl["learned_half_life_s"]
    assert 0.0 <= fl["learned_leaf_reuse"] <= 1.0
    assert "learned_half_life_s" not in doc["policies"]["vllm"]
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


def _simulate(tmp_path, capsys, model, hardware, name):
    out = tmp_path / f"{name}.json"
    assert main(["simulate", "--model", str(model), "--hardware", str(hardware),
                 "--workload", "chatbot", "--duration", "20", "--rate", "2",
                 "--num-adapters", "4", "--policy", "fastlibra,vllm", "--device-memory", "4GiB",
                 "--output-json", str(out)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    return header, json.loads(out.read_text())["policies"]


def test_simulate_takes_your_own_model_directory_and_hardware_file(tmp_path, capsys):
    from dataclasses import replace

    from fastlibra.sim.profiles import GPUS, MODELS

    model_dir, gpu_file = llama_2_7b_dir(tmp_path), a100_file(tmp_path)
    own = named_profile(str(model_dir), str(gpu_file))
    # the config's shape is the table's Llama-2 7B; only the parameter count is exact there
    # (6,738,415,616 against the table's rounded 6.738 B)
    assert own.model.num_params == pytest.approx(6.738e9, rel=1e-4)
    assert replace(own.model, name="llama-2-7b", num_params=6_738_000_000) == MODELS["llama-2-7b"]
    assert replace(own.gpu, name="a100-80g") == GPUS["a100-80g"]

    named_header, named = _simulate(tmp_path, capsys, "llama-2-7b", "a100-80g", "named")
    own_header, own = _simulate(tmp_path, capsys, model_dir, gpu_file, "own")
    assert own_header.startswith("my-llama on 1 x my-gpu: ")
    assert own_header.split(": ")[1] == named_header.split(": ")[1]  # pool and adapter sizes
    for policy in named:
        assert own[policy]["completed"] == named[policy]["completed"]
        assert own[policy]["ttft_mean"] == pytest.approx(named[policy]["ttft_mean"], rel=0.05)


def test_simulate_takes_the_profile_that_bench_fidelity_measured(tmp_path, capsys):
    spec = {"name": "cpu", "hbm_bytes": 64 * 2**30, "flops": 80e9, "hbm_bandwidth": 4e9,
            "pcie_bandwidth": 5e9, "nvlink_bandwidth": 5e9, "mfu": 1.0, "mbu": 1.0,
            "padded_attention": True, "roofline_p": 1.5}
    (tmp_path / "fidelity.json").write_text(json.dumps({"profile": {"spec": spec}}))
    header, result = _simulate(tmp_path, capsys, "llama-2-7b", tmp_path / "fidelity.json", "f")
    assert header.startswith("llama-2-7b on 1 x cpu: ")
    assert result["fastlibra"]["completed"] > 0


@pytest.mark.parametrize("content, message", [
    ('{"flops": 1e12', "bad.json: malformed JSON"),
    ('[1, 2]', "bad.json: expected a JSON object of GpuSpec fields"),
    ('{"flops": 1e12, "hbm_bytes": 8e10, "hbm_bandwidth": 2e12, "pcie_bandwidth": 2.5e10,'
     ' "nvlink_bandwidth": 3e11, "tflops": 5}', "bad.json: unknown field(s) tflops; GpuSpec has"),
    ('{"flops": 1e12}', "bad.json: missing hbm_bytes, hbm_bandwidth, pcie_bandwidth"),
    ('{"flops": -1, "hbm_bytes": 8e10, "hbm_bandwidth": 2e12, "pcie_bandwidth": 2.5e10,'
     ' "nvlink_bandwidth": 3e11}', "bad.json: GpuSpec.flops must be positive, got -1"),
    ('{"flops": "fast", "hbm_bytes": 8e10, "hbm_bandwidth": 2e12, "pcie_bandwidth": 2.5e10,'
     ' "nvlink_bandwidth": 3e11}', "bad.json: GpuSpec.flops must be a number, got 'fast'"),
])
def test_a_bad_hardware_file_is_a_clear_error(tmp_path, capsys, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--hardware", str(tmp_path / "bad.json"), "--duration", "5"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_model_or_hardware_names_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--hardware", "tpu-v9"])
    assert ("unknown hardware 'tpu-v9'; choose from a100-80g, h100-80g, h800-80g, h200-141g, "
            "or give a JSON file of GpuSpec fields") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--model", "gpt-5"])
    assert "unknown model 'gpt-5'; choose from llama-2-7b" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--model", str(tmp_path)])  # a directory without config.json
    assert "config.json: file not found" in capsys.readouterr().err


def test_adapters_from_disk_starts_every_policy_on_disk(tmp_path):
    """The same starting state for every policy: from disk, each pays its first reads."""
    loads = {}
    for flag in ([], ["--adapters-from-disk"]):
        out = tmp_path / f"sim{len(flag)}.json"
        assert main(["simulate", "--workload", "chatbot", "--duration", "20", "--rate", "2",
                     "--num-adapters", "5", "--policy", "fastlibra,sglang", "--device-memory",
                     "4GiB", "--output-json", str(out), *flag]) == 0
        doc = json.loads(out.read_text())
        loads[bool(flag)] = {p: r["ttft_adapter"] for p, r in doc["policies"].items()}
    for policy in ("fastlibra", "sglang"):
        assert loads[True][policy] > loads[False][policy], policy


def test_simulate_replicas_compares_routers_in_a_table_json_and_plots(tmp_path, capsys):
    out, plots = tmp_path / "cluster.json", tmp_path / "plots"
    assert main(["simulate", "--workload", "drift", "--replicas", "3", "--router",
                 "round-robin,fastlibra", "--rate", "3,6", "--duration", "20",
                 "--num-adapters", "20", "--device-memory", "4GiB", "--output-json", str(out),
                 "--plot", str(plots)]) == 0
    doc = json.loads(out.read_text())
    assert doc["replicas"] == 3 and set(doc["by_rate"]) == {"3.0", "6.0"}
    for r in doc["routers"].values():
        assert r["completed"] > 0 and r["ttft_p50"] <= r["ttft_p99"]
        assert r["replicas_per_adapter"]["t"] and len(r["replicas_per_adapter"]) == 9
    assert {p.name for p in plots.iterdir()} == {
        "ttft_cdf.png", "ttft_vs_rate.png", "replicas_per_adapter_round-robin.png",
        "replicas_per_adapter_fastlibra.png"}
    printed = capsys.readouterr().out
    assert "on 3 replicas" in printed and "decision us" in printed


def test_an_unknown_router_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--replicas", "2", "--router", "fastlibra,ray-default"])
    assert "unknown router 'ray-default'" in capsys.readouterr().err
