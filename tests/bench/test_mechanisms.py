"""`fastlibra bench mechanisms`: one table row per mechanism, computed from real runs."""

import json

from fastlibra.cache.cost import MECHANISMS
from fastlibra.cli import main


def test_bench_mechanisms_compares_each_mechanism_off_with_fastlibra(tmp_path, capsys):
    out = tmp_path / "mech.json"
    assert main(["bench", "mechanisms", "--duration", "4", "--jobs", "1", "--no-trace",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["mechanisms"]) == {f"fastlibra~{m}" for m in MECHANISMS}
    cells = [c["name"] for c in doc["cells"]]
    assert len(cells) == 12 and all(name.split("/s")[1] in "123" for name in cells)
    for name, row in doc["mechanisms"].items():
        # the reported change is recomputed from the stored per-run results
        for cell, change in row["per_cell"].items():
            on = doc["results"][f"{cell}|fastlibra"]["ttft_mean"]
            off = doc["results"][f"{cell}|{name}"]["ttft_mean"]
            assert change == off / on - 1
    assert "fastlibra~ghosts" in capsys.readouterr().out
