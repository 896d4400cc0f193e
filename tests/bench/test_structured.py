"""`fastlibra bench structured` end to end on a very small shape: one line with both
throughputs and the ratio, every constrained row still inside its grammar, and a JSON
record with the machine."""

import json

from fastlibra.cli import main


def test_bench_structured_prints_the_ratio_and_writes_json(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["bench", "structured", "--batch", "2", "--tokens", "6", "--reps", "1",
                 "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                 "--intermediate", "64", "--json", str(out)]) == 0
    line = capsys.readouterr().out
    assert "batch 2 x 6 tokens" in line and "structured/free time" in line
    assert "2/2 rows still inside the grammar" in line and "1 grammar compiled" in line
    doc = json.loads(out.read_text())
    assert len(doc["times"]["json"]) == 1 and doc["ratio"] > 0 and "machine" in doc
