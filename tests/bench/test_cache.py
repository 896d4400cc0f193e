"""`fastlibra bench cache` on a tiny size: it runs, and its JSON holds sane numbers.

No timing thresholds here: the numbers depend on the machine. BENCHMARKS.md has them.
"""

from __future__ import annotations

import json
import math

from fastlibra.cli import main

TINY = ["bench", "cache", "--adapters", "20", "--kv-blocks", "2000", "--batch", "8",
        "--steps", "20", "--seed", "1"]


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_bench_cache_tiny_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(TINY + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "step_ms" in printed and "target" in printed

    d = json.loads(out.read_text())
    for key in ("step_ms", "step_p99_ms", "match_per_s", "ops", "nodes", "blocks", "machine",
                "runs", "config", "target_met", "relative_to_baseline"):
        assert key in d, key
    assert d["policy"] == "fastlibra" and d["baseline"] == "vllm"
    assert set(d["runs"]) == {"fastlibra", "vllm"}
    for name, r in d["runs"].items():
        assert _positive(r["step_ms"]), name
        assert _positive(r["step_p99_ms"]) and r["step_p99_ms"] >= r["step_ms"], name
        assert _positive(r["match_per_s"]), name
        assert _positive(r["nodes"]), name
        for op in ("allocate", "append", "free", "tick"):
            assert r["ops"][op]["calls"] > 0, (name, op)
            assert math.isfinite(r["ops"][op]["mean_us"]) and r["ops"][op]["mean_us"] >= 0
        # The warm-up filled the cache: KV is cached and the last tier has evicted.
        assert r["blocks"]["cached_kv"]["total"] > 0, name
        assert r["events"]["requests"] > 0, name
    fl = d["runs"]["fastlibra"]
    assert fl["blocks"]["cached_kv"]["host"] > 0  # the host tier holds KV
    assert _positive(d["relative_to_baseline"]["fastlibra"]["step_ms"])
    m = d["machine"]
    assert m["cpu_count"] and m["python"] and m["platform"]
    assert d["step_ms"] == fl["step_ms"] and d["match_per_s"] == fl["match_per_s"]


def test_bench_cache_baseline_alone(tmp_path):
    out = tmp_path / "bench.json"
    assert main(TINY + ["--policy", "vllm", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["policy"] == "vllm" and d["baseline"] is None
    assert list(d["runs"]) == ["vllm"] and d["relative_to_baseline"] == {}
    assert _positive(d["step_ms"]) and _positive(d["match_per_s"])
