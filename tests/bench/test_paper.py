"""`fastlibra bench paper`: a tiny sweep end to end, and the summary arithmetic by hand."""

import json
import math

import pytest

from fastlibra.bench import paper
from fastlibra.bench.paper import (
    ALL_POLICIES,
    FASTLIBRA,
    LOWER_BOUND,
    MARKER_END,
    MARKER_START,
    ORACLE,
    OTHERS,
    SHARES,
    Pair,
    cell_job,
    drive,
    oracle_done,
    peak_load,
    rate_ladder,
    reduction,
    write_markdown,
)
from fastlibra.cli import main


def test_peak_load_interpolates_linearly_at_the_first_crossing():
    # 0.3 s at 2 req/s, 0.9 s at 4 req/s: 500 ms is a third of the way -> 2 + 2/3
    rate, censored = peak_load([1, 2, 4], [0.1, 0.3, 0.9])
    assert censored is None
    assert rate == pytest.approx(2 + 2 / 3)
    # unsorted input is sorted by rate first
    assert peak_load([4, 1, 2], [0.9, 0.1, 0.3])[0] == pytest.approx(2 + 2 / 3)
    # exactly at the threshold counts as crossed
    assert peak_load([1, 2], [0.1, 0.5]) == (2.0, None)
    # a non-monotone curve: the first crossing counts
    assert peak_load([1, 2, 3], [0.1, 0.6, 0.2])[0] == pytest.approx(1.8)


def test_peak_load_is_censored_outside_the_measured_rates():
    assert peak_load([1, 2, 4], [0.1, 0.2, 0.3]) == (4, "above")
    assert peak_load([1, 2, 4], [0.6, 0.7, 0.9]) == (1, "below")
    assert peak_load([1, 2], [float("nan"), 0.1]) == (1, "below")


def test_reduction():
    assert reduction(1.0, 4.0) == pytest.approx(0.75)
    assert reduction(2.0, 1.0) == pytest.approx(-1.0)
    assert reduction(1.0, 0.0) is None
    assert reduction(float("nan"), 1.0) is None


def test_oracle_stops_three_shares_past_the_best():
    def sweep(ttfts):
        return {s: {"ttft_mean": t, "rejected": 0} for s, t in zip(SHARES, ttfts, strict=False)}
    assert not oracle_done(sweep([3, 2, 1]))
    assert not oracle_done(sweep([3, 2, 1, 2, 3]))
    assert oracle_done(sweep([3, 2, 1, 2, 3, 4]))
    assert oracle_done(sweep([1, 1, 1, 1]))  # ties do not beat the best
    # a run with rejected requests never qualifies as the best
    s = sweep([1, 2, 3, 4])
    s[0.05]["rejected"] = 1
    assert not oracle_done(s)


def test_rate_ladder_spans_both_knees():
    rates = rate_ladder(10.0, 20.0, 4)
    assert rates == sorted(set(rates)) and len(rates) == 4
    assert rates[0] <= 6.0 and rates[-1] >= 24.0
    # a narrow ladder still has distinct increasing rates
    narrow = rate_ladder(1.0, 1.0, 5)
    assert len(set(narrow)) == 5 and narrow == sorted(narrow)


def test_write_markdown_appends_then_replaces_between_markers(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\n## Other\nkeep me\n")
    write_markdown(md, f"{MARKER_START}\nfirst\n{MARKER_END}\n")
    write_markdown(md, f"{MARKER_START}\nsecond\n{MARKER_END}\n")
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\n## Other\nkeep me\n")
    assert "second" in text and "first" not in text
    assert text.count(MARKER_START) == 1 and text.count(MARKER_END) == 1


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    argv = ["bench", "paper", "--quick", "--workloads", "chatbot", "--adapters", "20",
            "--rates", "1,4", "--duration", "15", "--jobs", "1",
            "--json", str(out / "sweep.json"), "--markdown", str(out / "B.md")]
    assert main(argv) == 0
    return json.loads((out / "sweep.json").read_text()), (out / "B.md").read_text()


def test_tiny_sweep_has_every_policy_in_every_cell(tiny_sweep):
    doc, _ = tiny_sweep
    assert [c["rate"] for c in doc["cells"]] == [1.0, 4.0]
    for c in doc["cells"]:
        assert (c["pair"], c["workload"], c["adapters"]) == \
            ("llama-2-7b@1xa100-80g", "chatbot", 20)
        assert set(c["policies"]) == set(ALL_POLICIES)
        for r in c["policies"].values():
            assert r["completed"] + r["rejected"] == c["requests"] > 0
            assert math.isfinite(r["ttft_mean"]) and r["ttft_p99"] >= r["ttft_p50"]
        # the oracle is the best vllm share of its sweep, and the sweep includes plain vllm
        sweep = {float(s): t for s, t in c["oracle"]["sweep"].items()}
        assert c["oracle"]["share"] in SHARES
        assert c["policies"][ORACLE]["ttft_mean"] == min(sweep.values())
        assert sweep[0.2] == c["policies"]["vllm"]["ttft_mean"]
        assert c["policies"][ORACLE]["ttft_mean"] <= c["policies"]["vllm"]["ttft_mean"]
        # nothing is evicted with unlimited memory: the working set is that run's footprint
        assert c["working_set_gib"] > 0
        assert c["policies"][LOWER_BOUND]["ttft_mean"] <= c["policies"][FASTLIBRA]["ttft_mean"] \
            * 1.05


def test_tiny_sweep_summary_is_computed_from_the_cells(tiny_sweep):
    doc, _ = tiny_sweep
    cells, s = doc["cells"], doc["summary"]
    assert s["cells"] == len(cells) == 2
    assert set(s["vs"]) == set(OTHERS)
    for other in OTHERS:
        for key, label in (("ttft_mean", "mean_ttft"), ("ttft_p99", "p99_ttft")):
            per_cell = [1 - c["policies"][FASTLIBRA][key] / c["policies"][other][key]
                        for c in cells]
            assert s["vs"][other][f"{label}_reduction"] == pytest.approx(sum(per_cell) / 2)
            ours = sum(c["policies"][FASTLIBRA][key] for c in cells)
            theirs = sum(c["policies"][other][key] for c in cells)
            assert s["vs"][other][f"{label}_reduction_of_means"] == pytest.approx(
                1 - ours / theirs)
        better = {x["cell"] for x in s["vs"][other]["cells_where_better_than_fastlibra"]}
        assert better == {paper.cell_id(c) for c in cells
                          if c["policies"][other]["ttft_mean"]
                          < 0.99 * c["policies"][FASTLIBRA]["ttft_mean"]}
    gap = [c["policies"][FASTLIBRA]["ttft_mean"] / c["policies"][LOWER_BOUND]["ttft_mean"] - 1
           for c in cells]
    assert s["lower_bound_gap"]["mean_ttft_gap"] == pytest.approx(sum(gap) / 2)
    (group,) = s["peak_load"]
    assert group == "llama-2-7b@1xa100-80g/chatbot/20"
    for p in ALL_POLICIES:
        expect = peak_load([1.0, 4.0], [c["policies"][p]["ttft_mean"] for c in cells])
        got = s["peak_load"][group][p]
        assert (got["rate"], got["censored"]) == (pytest.approx(expect[0]), expect[1])


def test_tiny_sweep_sets_each_paper_ablation_beside_the_papers_number(tiny_sweep):
    doc, md = tiny_sweep
    cells, abl = doc["cells"], doc["summary"]["paper_ablations"]
    assert list(abl) == ["fastlibra-paper-no-lora", "fastlibra-paper-no-transfer",
                         "fastlibra-paper-no-visit", "fastlibra-paper-no-recency"]
    assert [a["paper"] for a in abl.values()] == [1.21, 1.19, 1.25, 1.21]
    for p, a in abl.items():
        ratios = [c["policies"][p]["ttft_mean"] / c["policies"]["fastlibra-paper"]["ttft_mean"]
                  for c in cells]
        assert a["ttft_ratio_geomean"] == pytest.approx(math.sqrt(ratios[0] * ratios[1]))
        assert f"| {p} | x{a['ttft_ratio_geomean']:.2f} |" in md


def test_tiny_sweep_markdown_has_the_section(tiny_sweep):
    _, md = tiny_sweep
    assert md.count(MARKER_START) == 1 and md.count(MARKER_END) == 1
    assert "Paper-style sweep" in md and "wall time" in md and "Python" in md
    assert "`fastlibra bench paper --quick --workloads chatbot --adapters 20 --rates 1,4" in md
    for p in ("vllm-oracle", "fastlibra-nodep", "fastlibra-lru"):
        assert f"| {p} |" in md


def test_process_pool_gives_the_same_cell_as_one_process():
    pair = Pair("llama-2-7b", "a100-80g", 1, 32)
    jobs1 = {0: cell_job(pair, "translation", 20, 1.0, 5.0, 0)}
    jobs2 = {0: cell_job(pair, "translation", 20, 1.0, 5.0, 0)}
    one = drive(jobs1, 1)[0]
    two = drive(jobs2, 2)[0]
    for p in ALL_POLICIES:
        a = {k: v for k, v in one["policies"][p].items() if k != "wall_s"}
        b = {k: v for k, v in two["policies"][p].items() if k != "wall_s"}
        assert a == b


def test_calibration_finds_the_crossing_and_ignores_empty_runs():
    pair = Pair("llama-2-7b", "a100-80g", 1, 32)

    def fake(task):  # linear TTFT in the rate, 500 ms at 5 req/s; the first run is empty
        t = float("nan") if task.rate == paper.CAL_START else 0.1 * task.rate
        return {"ttft_mean": t}

    job = paper.saturation_job(pair, "chatbot", 20, "vllm", 10.0, 0)
    assert drive({0: job}, 1, runner=fake)[0] == pytest.approx(5.0)

    def slow(task):  # over the threshold even when idle: halving stops at CAL_MIN
        return {"ttft_mean": 0.8}

    job = paper.saturation_job(pair, "chatbot", 20, "vllm", 10.0, 0)
    assert drive({0: job}, 1, runner=slow)[0] == pytest.approx(paper.CAL_MIN)


def test_host_ratio_sizes_the_host_pool_of_every_run():
    pair = Pair("llama-2-7b", "a100-80g", 1, 32)
    seen = []

    def record(task):
        seen.append(task)
        return {"ttft_mean": 0.01 * task.rate}

    drive({0: paper.saturation_job(pair, "chatbot", 20, "vllm", 10.0, 0, host_ratio=1.5)}, 1,
          runner=record)
    assert seen and {t.host_memory for t in seen} == {int(1.5 * pair.budget_bytes())}
    assert pair.host_bytes(None) == paper.HOST_DEFAULT


def test_a_host_that_fills_changes_what_fastlibra_reuses():
    """With the host at the device budget the host tier drops KV it would otherwise keep."""
    pair = Pair("llama-2-7b", "a100-80g", 1, 32)
    big = drive({0: cell_job(pair, "chatbot", 20, 20.0, 30.0, 0)}, 1)[0]
    small = drive({0: cell_job(pair, "chatbot", 20, 20.0, 30.0, 0, host_ratio=1.0)}, 1)[0]
    fl_big, fl_small = big["policies"]["fastlibra"], small["policies"]["fastlibra"]
    assert fl_small["host_hit_rate"] < fl_big["host_hit_rate"]
    assert small["policies"]["lower-bound"]["ttft_mean"] == big["policies"]["lower-bound"]["ttft_mean"]


def test_a_pair_of_your_own_model_and_hardware_goes_by_their_names(tmp_path):
    from simfixtures import a100_file, llama_2_7b_dir

    own = Pair(str(llama_2_7b_dir(tmp_path)), str(a100_file(tmp_path)), 2, 16)
    assert own.label == "my-llama@2xmy-gpu"
    assert Pair("llama-2-7b", "a100-80g", 1, 32).label == "llama-2-7b@1xa100-80g"
    # the sweep's budget rule applies to it like to a pair of the table
    assert own.budget_bytes() == Pair("llama-2-7b", "a100-80g", 2, 16).budget_bytes()
