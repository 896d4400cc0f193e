"""`SimProfile.step_time`'s weight terms: every token goes through the decoder layers,
only each sequence's last token through the output projection, and the embedding is a
gather; a shape without a vocabulary charges every parameter to every token as before."""

from dataclasses import replace

import pytest

from fastlibra.config import ConfigError, ModelShape
from fastlibra.sim.profiles import GPUS, MODELS, SimProfile, attention_work, roofline, weight_work

LLAMA3 = MODELS["llama-3-8b"]
# Compute-bound at any batch: HBM so fast that the memory term never wins.
GPU = replace(GPUS["a100-80g"], hbm_bandwidth=1e18)


def test_llama3_8b_body_is_its_decoder_layers():
    attn = 4096 * 128 * (2 * 32 + 2 * 8)
    mlp = 3 * 4096 * 14336
    assert LLAMA3.head_params == 128256 * 4096
    assert LLAMA3.body_params == pytest.approx(32 * (attn + mlp), rel=1e-3)


def test_a_prefill_pays_the_output_projection_once_not_per_token():
    prof = SimProfile(LLAMA3, GPU)
    n = 2048
    attn, _ = attention_work(LLAMA3, [(n, 0)], 0, 0)
    flops = 2 * (LLAMA3.body_params * n + LLAMA3.head_params) + attn
    want = flops / (GPU.flops * GPU.mfu) + GPU.step_overhead_s + GPU.per_seq_overhead_s
    assert prof.prefill_time(n) == pytest.approx(want)
    # 13 % of Llama-3 8B's parameters are embedding + output projection: the old charge
    # of 2 x num_params per token overstated a long prefill by about that much.
    old = (2 * LLAMA3.num_params * n + attn) / (GPU.flops * GPU.mfu)
    assert 0.10 < 1 - (prof.prefill_time(n) - GPU.step_overhead_s) / old < 0.16


def test_each_decoding_sequence_pays_one_output_projection():
    prof = SimProfile(LLAMA3, GPU)
    one, two = prof.step_time([], 100, 1, 0), prof.step_time([], 200, 2, 0)
    per_seq = 2 * (LLAMA3.body_params + LLAMA3.head_params) + 4 * 32 * 32 * 128 * 100
    assert two - one == pytest.approx(per_seq / (GPU.flops * GPU.mfu) + GPU.per_seq_overhead_s)


def test_memory_term_streams_every_weight_but_the_embedding():
    flops, streamed = weight_work(LLAMA3, tokens=1, seqs=1)
    assert streamed == (LLAMA3.num_params - LLAMA3.head_params) * LLAMA3.dtype_bytes


def test_without_a_vocabulary_every_parameter_is_charged_to_every_token():
    shape = replace(LLAMA3, vocab_size=0)
    assert shape.body_params == shape.num_params and shape.head_params == 0
    assert weight_work(shape, 10, 2) == (2 * shape.num_params * 10,
                                         shape.num_params * shape.dtype_bytes)


def test_tied_embeddings_count_the_matrix_once():
    kw = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
              intermediate_size=128, vocab_size=1000)
    tied = ModelShape("t", tied_embeddings=True, **kw)
    untied = ModelShape("u", **kw)
    assert untied.num_params - tied.num_params == 1000 * 64
    assert tied.body_params == untied.body_params


def test_a_parameter_count_below_the_vocabulary_matrices_is_refused():
    with pytest.raises(ConfigError, match="must exceed the embedding and output projection"):
        replace(LLAMA3, num_params=2 * LLAMA3.head_params)


def test_the_smooth_roofline_is_max_where_one_side_dominates_and_more_at_the_knee():
    assert roofline(3.0, 1.0, None) == 3.0
    assert roofline(3.0, 0.0, 2.0) == pytest.approx(3.0)
    assert roofline(3.0, 4.0, 1.0) == pytest.approx(7.0)  # p = 1: the sum
    assert roofline(3.0, 4.0, 2.0) == pytest.approx(5.0)
    assert roofline(100.0, 1.0, 3.0) == pytest.approx(100.0, rel=1e-5)
    assert roofline(0.0, 0.0, 2.0) == 0.0
    knee = [roofline(1.0, 1.0, p) for p in (1.25, 1.5, 2.0, 4.0)]
    assert knee == sorted(knee, reverse=True) and knee[-1] > 1.0


def test_a_gpu_profile_keeps_the_plain_max():
    assert all(g.roofline_p is None for g in GPUS.values())
    prof = SimProfile(LLAMA3, GPUS["a100-80g"])
    smooth = SimProfile(LLAMA3, replace(GPUS["a100-80g"], roofline_p=2.0))
    # one decode: memory-bound by far, both agree; a 512-token prefill sits near the knee
    assert smooth.step_time([], 100, 1, 0) == pytest.approx(prof.step_time([], 100, 1, 0),
                                                            rel=1e-3)
    assert smooth.prefill_time(128) > prof.prefill_time(128)
