"""`fastlibra bench model` end to end at a tiny size: the JSON has every key and every
measurement is positive and finite (no timing thresholds: this box is shared)."""

from __future__ import annotations

import json
import math

from fastlibra.cli import main

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--intermediate", "128", "--vocab", "256", "--rank", "4", "--prompt-len", "8",
        "--decode-tokens", "3", "--batches", "1,4", "--prefill-len", "40", "--warmup", "1",
        "--reps", "2", "--threads", "1"]


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_bench_model_writes_ratios(tmp_path, capsys):
    out = tmp_path / "model.json"
    assert main(["bench", "model", *TINY, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "decode tok/s, batch 4" in table and "prefill cost of an adapter" in table

    res = json.loads(out.read_text())
    assert {"machine", "model", "settings", "decode", "prefill", "targets"} <= set(res)
    assert res["machine"]["torch_threads"] == 1
    assert res["model"]["hidden"] == 64 and res["model"]["kv_heads"] == 2
    assert [d["batch"] for d in res["decode"]] == [1, 4]
    for d in res["decode"]:
        for key in ("ours_tok_s", "transformers_tok_s", "ratio"):
            assert positive(d[key]), (key, d)
        assert len(d["runs_s"]["ours"]) == len(d["runs_s"]["transformers"]) == 2
    p = res["prefill"]
    assert p["tokens"] == 40
    for key in ("base_s", "adapter_s", "transformers_s", "adapter_ratio",
                "speedup_vs_transformers"):
        assert positive(p[key]), (key, p)
    # batch 16 is not run here, so only its target is absent
    assert set(res["targets"]) == {"decode_b1", "adapter_prefill"}
    for t in res["targets"].values():
        assert positive(t["ratio"]) and isinstance(t["met"], bool)


def test_maskless_fast_paths_match_peft(tmp_path_factory):
    """The batch shapes the benchmark times take the no-mask paths of the forward pass:
    equal-length prompts (plain causal) and equal-length decode (each query sees its
    whole context). Both still match transformers + peft, base and adapter rows mixed."""
    import torch
    from tinymodels import Blocks, llama_setup, runner, tokens

    from fastlibra.model import SeqInput

    base, adapters, ref = llama_setup(tmp_path_factory)
    r = runner(base, adapters)
    blocks = Blocks()
    seqs = [(tokens(7, 40 + i), ad) for i, ad in enumerate((None, "a", "a", "b"))]
    tables = [blocks.table(7 + 3) for _ in seqs]
    out = r.forward_all([SeqInput(t, 0, tab, ad) for (t, ad), tab in zip(seqs, tables,
                                                                          strict=True)])
    for (t, ad), got in zip(seqs, out, strict=True):
        torch.testing.assert_close(got, ref.logits(t, ad), atol=1e-4, rtol=0)
    for _ in range(3):
        nxt = [int(o[-1].argmax()) for o in out]
        got = r.forward([SeqInput([n], len(t), tab, ad)
                         for (t, ad), n, tab in zip(seqs, nxt, tables, strict=True)])
        seqs = [(t + [n], ad) for (t, ad), n in zip(seqs, nxt, strict=True)]
        for g, (t, ad) in zip(got, seqs, strict=True):
            torch.testing.assert_close(g, ref.logits(t, ad)[-1], atol=1e-4, rtol=0)
        out = [g[None] for g in got]
