"""Start-up calibration of the real engine (`fastlibra/calibrate.py`): the cache's cost
model prices misses with what this machine measured, keeps following it while serving,
and keeps a given profile untouched when calibration is off. No assertion depends on how
fast this machine is: measured values are compared with what the engine itself recorded,
refinements are driven by injected observations."""

from __future__ import annotations

import math

import pytest
import torch
from llmsetup import served_setup
from tinymodels import DEVICE, tokens

from fastlibra.cache import MoveKind
from fastlibra.calibrate import DRIFT, StepFit
from fastlibra.config import HardwareProfile
from fastlibra.llm import LLM
from fastlibra.model.sampling import SamplingParams

torch.set_num_threads(1)
KIB = 1024
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return served_setup(tmp_path_factory)


def make_llm(served, host_memory=256 * KIB, **kw) -> LLM:
    base, adapters, _ = served
    return LLM(base, adapters, device_memory=256 * KIB, host_memory=host_memory,
               block_size=4, dtype="float32", device=DEVICE, **kw)


def test_the_cost_model_prices_misses_with_the_profile_measured_at_start(served):
    llm = make_llm(served, hardware=HardwareProfile(prefill_per_token_pair=3e-9))
    cal, cost = llm.calibration, llm.cache.cost
    p = cal.profile
    assert cal.measured and p.name == "calibrated-cpu" and cost.hw is p
    assert p.prefill_per_token_pair == 3e-9  # not measured: the given value
    default = HardwareProfile()
    for f in ("h2d_bandwidth", "d2h_bandwidth", "disk_bandwidth", "prefill_per_token"):
        v = getattr(p, f)
        assert math.isfinite(v) and v > 0 and v != getattr(default, f), f
    # the adapter reads at start set the disk rate: arena bytes / read time, parse included
    assert p.adapter_parse_s == 0.0
    # a miss is priced with the measured numbers
    a = llm.cache.adapters["a"]
    assert cost.transfer_time(a) == a.nbytes / p.h2d_bandwidth
    assert cost.disk_time(a) == pytest.approx(a.nbytes / p.disk_bandwidth)
    assert cost.block_h2d_s == llm.cache.cfg.block_bytes / p.h2d_bandwidth
    # ... and the copy engine starts from the same numbers
    assert llm.mover.bandwidth == {MoveKind.SWAP_IN: p.h2d_bandwidth,
                                   MoveKind.SWAP_OUT: p.d2h_bandwidth}
    assert "calibrated-cpu (measured in" in cal.describe()
    # the scratch prefills left nothing behind: outputs are still the reference's
    _, _, ref = served
    out = llm.generate([tokens(9, 1)], adapter=["a"], sampling_params=GREEDY)
    assert out[0].token_ids == ref.greedy(tokens(9, 1), "a", 4)


def test_a_given_profile_is_used_as_is_when_calibration_is_off(served):
    given = HardwareProfile(name="mine", h2d_bandwidth=3e9, disk_bandwidth=1e8,
                            prefill_per_token=2e-3)
    llm = make_llm(served, hardware=given, calibrate=False)
    llm.generate([tokens(9, 1), tokens(30, 2)], adapter=["a", "b"], sampling_params=GREEDY)
    llm.mover.bandwidth[MoveKind.SWAP_IN] = 100 * given.h2d_bandwidth
    llm.generate([tokens(9, 3)], sampling_params=GREEDY)
    assert llm.cache.cost.hw is given and llm.calibration.updates == 0
    assert "given, not measured" in llm.calibration.describe()


def test_a_drift_in_measured_copies_reaches_the_cost_model_and_rebuilds_its_keys(served):
    llm = make_llm(served, host_memory=0)  # nothing to prefetch: no copy moves the numbers
    cost, start = llm.cache.cost, llm.calibration.profile
    rekeys = []
    swapper_rekey = cost.on_rekey
    cost.on_rekey = lambda: (rekeys.append(1), swapper_rekey())
    # within DRIFT of the profile in use: nothing changes
    llm.mover.bandwidth[MoveKind.SWAP_IN] = start.h2d_bandwidth * (DRIFT - 0.1)
    llm.calibration.refresh(llm.mover.bandwidth, llm.mover.load_s_per_byte)
    assert cost.hw is start and rekeys == []
    # beyond it: the next step hands the cost model the copy engine's number
    llm.mover.bandwidth[MoveKind.SWAP_IN] = start.h2d_bandwidth * 3
    llm.generate([tokens(9, 2)], sampling_params=GREEDY)
    assert cost.hw.h2d_bandwidth == start.h2d_bandwidth * 3
    assert cost.block_h2d_s == llm.cache.cfg.block_bytes / cost.hw.h2d_bandwidth
    assert llm.calibration.updates >= 1 and rekeys


def test_observed_steps_refine_the_prefill_cost_the_cost_model_uses(served):
    llm = make_llm(served)
    cal = llm.calibration
    per_token = cal.profile.prefill_per_token * 4  # the machine got 4x slower, say
    for _ in range(300):  # the start-up points fade (FORGET) under steady observations
        for n in (1, 8, 64):
            cal.observe_step(n, 0.001 + n * per_token)
    cal.refresh(llm.mover.bandwidth, llm.mover.load_s_per_byte)
    assert llm.cache.cost.hw.prefill_per_token == pytest.approx(per_token, rel=1e-3)
    assert llm.cache.cost.hw.prefill_base == pytest.approx(0.001, rel=1e-2)


def test_step_fit_is_a_line_through_its_points_or_nothing():
    fit = StepFit()
    assert fit.line() is None
    fit.add(10, 0.5)
    fit.add(10, 0.7)
    assert fit.line() is None  # one x: no slope
    fit.add(30, 1.6)
    base, slope = fit.line()
    # weights after forgetting: x=10 (0.5: 0.99^2, 0.7: 0.99), x=30 (1)
    assert slope > 0 and base >= 0
    exact = StepFit()
    for n in (4, 16, 64):
        exact.add(n, 0.002 + n * 1e-4)
    assert exact.line() == pytest.approx((0.002, 1e-4))
    falling = StepFit()
    falling.add(1, 1.0)
    falling.add(100, 0.5)
    assert falling.line() is None  # a negative cost per token is noise, not a profile


def test_serve_and_generate_take_no_calibrate(served):
    from fastlibra.cli import _llm_args, build_parser
    from fastlibra.server import ServerConfig

    base, adapters, _ = served
    for command in ("serve", "generate"):
        argv = [command, "--model", str(base)] + (["--prompt", "w005"] if command == "generate"
                                                  else [])
        assert _llm_args(build_parser().parse_args(argv))["calibrate"] is True
        assert _llm_args(build_parser().parse_args([*argv, "--no-calibrate"]))["calibrate"] \
            is False
    cfg = ServerConfig(base, dict(adapters), device_memory=256 * KIB, host_memory=256 * KIB,
                       dtype="float32", device="cpu", block_size=4,
                       engine_args={"calibrate": False})
    llm = cfg.make_llm()
    assert not llm.calibration.measured and llm.cache.cost.hw == HardwareProfile()
