"""`fastlibra bench kernels` on a tiny shape under Triton's interpreter: both paths on one
arena agree on a mixed step, and the table has a row per batch x adapters."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")
from fastlibra.cli import main  # noqa: E402


@pytest.mark.slow
def test_bench_kernels_tiny(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--device", "cpu", "--dtype", "float32", "--hidden", "64",
                 "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
                 "--vocab", "128", "--adapters", "3", "--rank", "8", "--context", "10",
                 "--chunk", "6", "--batches", "1,4", "--block-size", "4", "--warmup", "0",
                 "--reps", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["mixed_argmax_agree"] == doc["mixed_rows"] == 6 + 3
    assert doc["mixed_max_logit_diff"] < 1e-4
    assert [(r["batch"], r["adapters"]) for r in doc["steps"]] == [(1, 0), (1, 1), (4, 0), (4, 3)]
    assert "batch adapters  torch ms kernels ms  speedup" in capsys.readouterr().out
