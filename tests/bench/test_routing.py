"""`fastlibra bench routing`: one decision time per router, as a line and in JSON."""

import json

from fastlibra.cli import main


def test_bench_router_prints_and_records_a_decision_time_per_router(tmp_path, capsys):
    out = tmp_path / "router.json"
    assert main(["bench", "routing", "--replicas", "8", "--adapters", "20",
                 "--sessions-per-replica", "3", "--requests", "50",
                 "--router", "least-loaded,fastlibra", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["routers"]) == {"least-loaded", "fastlibra"} and doc["replicas"] == 8
    for r in doc["routers"].values():
        assert 0 < r["p50_us"] <= r["p99_us"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "8 replicas, 20 adapters, 3 conversations cached per replica, 50 requests"
    assert [ln.split()[0] for ln in lines[1:3]] == ["least-loaded", "fastlibra"]
