"""`fastlibra demo` end to end at a tiny duration: the real engine under two policies, the
JSON, the PNG, and the model built once into the cache directory (no timing thresholds:
this box is shared)."""

import json
import math

import pytest

from fastlibra.cli import main
from fastlibra.demo import MANIFEST, cached_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLIBRA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_demo_replays_each_policy_on_the_real_engine(tmp_path, cache, capsys):
    out, plot = tmp_path / "demo.json", tmp_path / "plots" / "demo.png"
    assert main(["demo", "--policy", "fastlibra,vllm", "--duration", "2.5", "--seed", "4",
                 "--json", str(out), "--plot", str(plot)]) == 0
    printed = capsys.readouterr()
    assert "building" in printed.err
    res = json.loads(out.read_text())
    turns = res["workload"]["turns"]
    assert turns >= res["workload"]["sessions"] >= 1
    assert set(res["policies"]) == set(res["ttft_ms"]) == {"fastlibra", "vllm"}
    for name, r in res["policies"].items():
        assert name in printed.out
        assert r["requests"] == len(res["ttft_ms"][name]) == turns
        ttfts = [r["ttft_mean_ms"], r["ttft_p99_ms"], *res["ttft_ms"][name]]
        assert all(math.isfinite(t) and t > 0 for t in ttfts), name
        assert 0 <= r["device_hit_rate"] + r["host_hit_rate"] <= 1
        assert r["adapter_loads"] == r["adapter_host_hits"] + r["adapter_disk_loads"]
        assert set(r["bytes_moved"]) == {"swap_out", "swap_in", "load", "load_host"}
    # Seed 4: 8 sessions over lora-0, 1, 3 and 4 (13, 7, 7 and 13 blocks). vllm's static
    # adapter share (24 of 123 device blocks) fits two at a time, so adapters leave while
    # their KV stays; the dependency rule never lets fastlibra keep KV without its adapter.
    assert res["policies"]["vllm"]["invalid_kv_blocks_peak"] > 0
    assert res["policies"]["fastlibra"]["invalid_kv_blocks_peak"] == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The model was built once: the next run finds it complete and reads it.
    (root,) = cache.iterdir()
    built = (root / MANIFEST).stat().st_mtime_ns
    base, adapters = cached_model()
    assert "using the model and adapters cached" in capsys.readouterr().err
    assert (root / MANIFEST).stat().st_mtime_ns == built
    assert base.parent == root and sorted(adapters) == [f"lora-{i}" for i in range(6)]
    assert (base / "config.json").exists()
    assert all((p / "adapter_model.safetensors").exists() for p in adapters.values())


def test_an_interrupted_build_is_redone(cache):
    base, _ = cached_model()
    root = base.parent
    (root / MANIFEST).unlink()  # as if the build stopped before its last write
    (root / "half-written").write_text("")
    assert cached_model()[0] == base
    assert (root / MANIFEST).exists() and not (root / "half-written").exists()
