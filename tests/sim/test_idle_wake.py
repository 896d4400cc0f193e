"""`GpuSpec.idle_wake_s`: on a CPU the first step after a pause is slower (cold caches
and clocks); the simulated runner charges it to a step that starts after the previous one
ended more than `IDLE_AFTER_S` earlier, never to back-to-back steps, and GPU profiles
charge nothing."""

from dataclasses import replace

import pytest

from fastlibra.config import LoraShape, ModelShape
from fastlibra.engine.request import Request
from fastlibra.engine.scheduler import Batch
from fastlibra.sim.profiles import GPUS, GiB, GpuSpec, SimProfile
from fastlibra.sim.runner import IDLE_AFTER_S, SimMover, SimRunner

TINY = ModelShape("tiny", num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2,
                  intermediate_size=688, dtype_bytes=4)
CPU = GpuSpec("cpu", 64 * GiB, flops=50e9, hbm_bandwidth=5e9, pcie_bandwidth=4e9,
              nvlink_bandwidth=4e9, mfu=1.0, mbu=1.0)


def decode_batch() -> Batch:
    req = Request("r", [5] * 8, 4, output=[1, 2, 3, 4])
    req.num_computed = 8
    return Batch(decodes=[req])


def test_only_a_step_after_a_pause_pays_the_wake_up():
    wake = 0.002
    profile = SimProfile(TINY, replace(CPU, idle_wake_s=wake), 1, LoraShape(8))
    runner = SimRunner(profile, SimMover(profile))
    plain = SimRunner(SimProfile(TINY, CPU, 1, LoraShape(8)), SimMover(profile))
    step = plain.execute(decode_batch(), 0.0).duration
    first = runner.execute(decode_batch(), 0.0).duration
    assert first == pytest.approx(step + wake)  # nothing ran before: idle
    back_to_back = runner.execute(decode_batch(), first).duration
    assert back_to_back == pytest.approx(step)
    after_pause = runner.execute(decode_batch(), first + step + 2 * IDLE_AFTER_S).duration
    assert after_pause == pytest.approx(step + wake)


def test_gpu_profiles_do_not_wake_up():
    assert all(g.idle_wake_s == 0 for g in GPUS.values())
