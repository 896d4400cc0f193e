"""`GpuSpec.padded_attention`: a runner that pads the batch (fastlibra's own dense SDPA)
pays the longest query times the longest context for every sequence of a mixed step;
a single sequence, a uniform decode batch and every GPU profile cost what they did."""

from dataclasses import replace

import pytest

from fastlibra.config import LoraShape, ModelShape
from fastlibra.sim.profiles import GPUS, GiB, GpuSpec, SimProfile, attention_work

TINY = ModelShape("tiny", num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2,
                  intermediate_size=688, dtype_bytes=4)
PAIR = 4 * 4 * 256  # 4 * layers * heads * head_dim
CPU = GpuSpec("cpu", 64 * GiB, flops=50e9, hbm_bandwidth=5e9, pcie_bandwidth=4e9,
              nvlink_bandwidth=4e9, mfu=1.0, mbu=1.0, step_overhead_s=3e-3,
              per_seq_overhead_s=3e-4, lora_launch_s=2e-4)


def test_a_mixed_step_pads_every_sequence_to_the_longest_query_and_context():
    # prefill 64 new tokens + 4 decodes of 128 context each
    flops, kv = attention_work(TINY, [(64, 0)], 4 * 128, 4, padded=True)
    assert flops == PAIR * 5 * 64 * 128 and kv == 5 * 128
    flops, kv = attention_work(TINY, [(64, 0)], 4 * 128, 4, padded=False)
    assert flops == PAIR * (64 * 32 + 4 * 128) and kv == 64 + 4 * 128


def test_the_longest_context_may_be_a_prefix_or_a_decode():
    flops, kv = attention_work(TINY, [(16, 400), (8, 0)], 2 * 100, 2, padded=True)
    assert flops == PAIR * 4 * 16 * 416 and kv == 4 * 416
    flops, kv = attention_work(TINY, [(16, 0)], 2 * 300, 2, padded=True)
    assert flops == PAIR * 3 * 16 * 300 and kv == 3 * 300


@pytest.mark.parametrize("args", [([(64, 0)], 0, 0), ([(32, 256)], 0, 0), ([], 4 * 128, 4)])
def test_one_sequence_or_a_uniform_decode_batch_costs_the_same_padded(args):
    assert attention_work(TINY, *args, padded=True) == attention_work(TINY, *args)


def test_step_time_charges_the_padding_only_where_the_spec_says_so():
    lora = LoraShape(rank=16, dtype_bytes=4)
    ragged = SimProfile(TINY, CPU, 1, lora)
    padded = SimProfile(TINY, replace(CPU, padded_attention=True), 1, lora)
    mixed = ([(64, 0)], 4 * 128, 4, 1)
    extra = PAIR * (5 * 64 * 128 - (64 * 32 + 4 * 128)) / CPU.flops
    assert padded.step_time(*mixed) - ragged.step_time(*mixed) == pytest.approx(extra)
    assert padded.step_time([(64, 0)], 0, 0, 0) == ragged.step_time([(64, 0)], 0, 0, 0)
    assert not any(g.padded_attention for g in GPUS.values())
