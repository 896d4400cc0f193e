"""`fastlibra demo`: the table a new user sees first."""

import json

from fastlibra.cli import main


def test_demo_compares_every_policy_and_only_non_dependency_policies_hold_invalid_kv(
        tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["policies"]
    assert set(rows) == {"fastlibra", "fastlibra-nodep", "fastlibra-lru", "vllm", "sglang",
                         "slora"}
    printed = capsys.readouterr().out
    for name in rows:
        assert name in printed
    # The dependency rule is the difference: same workload, same memory.
    assert rows["fastlibra"]["invalid_kv_blocks_peak"] == 0
    assert rows["fastlibra-lru"]["invalid_kv_blocks_peak"] == 0
    assert rows["vllm"]["invalid_kv_blocks_peak"] > 0
    # Only policies with a host KV tier get host hits; S-LoRA reuses nothing.
    assert rows["fastlibra"]["host_hit_rate"] > 0
    assert rows["vllm"]["host_hit_rate"] == 0
    assert rows["slora"]["device_hit_rate"] == 0
    assert rows["fastlibra"]["device_hit_rate"] > 0


def test_demo_is_deterministic_for_a_seed(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    main(["demo", "--policy", "fastlibra,vllm", "--seed", "3", "--json", str(a)])
    main(["demo", "--policy", "fastlibra,vllm", "--seed", "3", "--json", str(b)])
    assert json.loads(a.read_text()) == json.loads(b.read_text())
