"""Config: sizes in bytes and seconds from architecture numbers, and bad values refused."""

import dataclasses

import pytest
from conftest import BLOCK_BYTES, MODEL, make_cfg

from fastlibra.config import (
    CacheConfig,
    ConfigError,
    HardwareProfile,
    LoraShape,
    ModelShape,
    SwapperConfig,
)


def test_tiny_model_kv_and_block_bytes():
    # 2 (K, V) x 1 layer x 1 KV head x head_dim 4 x 2 bytes = 16 bytes per token
    assert MODEL.head_dim == 4
    assert MODEL.kv_bytes_per_token == 16
    cfg = make_cfg()
    assert cfg.block_bytes == BLOCK_BYTES == 64


def test_llama3_8b_kv_bytes_per_token():
    llama = ModelShape("llama3-8b", num_layers=32, hidden_size=4096, num_heads=32,
                       num_kv_heads=8, intermediate_size=14336)
    # 2 x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB per token
    assert llama.kv_bytes_per_token == 131072
    assert llama.num_params == 32 * (4096 * 128 * (64 + 16) + 3 * 4096 * 14336) \
        + 65 * 4096  # two RMSNorms a layer and the final one


def test_lora_bytes_count_a_and_b_of_every_target_in_every_layer():
    # q (8 -> 8), k (8 -> 4), v (8 -> 4), o (8 -> 8): rank x (in + out) each
    per_layer = 2 * ((8 + 8) + (8 + 4) + (8 + 4) + (8 + 8))
    assert LoraShape(rank=2).nbytes(MODEL) == 1 * per_layer * 2 == 224
    assert LoraShape(rank=2, target_modules=("down_proj",)).nbytes(MODEL) == 2 * (16 + 8) * 2


def test_blocks_for_bytes_and_tokens_round_up():
    cfg = make_cfg()
    assert [cfg.blocks_for_bytes(n) for n in (1, 64, 65, 128)] == [1, 1, 2, 2]
    assert [cfg.blocks_for_tokens(n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_prefill_time_grows_with_prefix_and_is_zero_for_nothing():
    hw = HardwareProfile(prefill_base=1.0, prefill_per_token=0.1, prefill_per_token_pair=0.01)
    assert hw.prefill_time(0, 100) == 0.0
    assert hw.prefill_time(4) == pytest.approx(1.0 + 0.4 + 4 * 2 * 0.01)
    assert hw.prefill_time(4, 10) == pytest.approx(1.0 + 0.4 + 4 * 12 * 0.01)
    assert HardwareProfile(h2d_bandwidth=100.0).h2d_time(50) == 0.5
    assert HardwareProfile(disk_bandwidth=10.0, adapter_parse_s=1.0).disk_load_time(20) == 3.0


@pytest.mark.parametrize("field, value, message", [
    ("device_blocks", 0, "device_blocks must be positive, got 0"),
    ("device_blocks", -3, "device_blocks must be positive, got -3"),
    ("host_blocks", -1, "host_blocks must not be negative, got -1"),
    ("block_size", 0, "block_size must be positive"),
    ("decay_half_life_s", 0.0, "decay_half_life_s must be positive"),
])
def test_cache_config_refuses_bad_capacities(field, value, message):
    kw = {"model": MODEL, "device_blocks": 8, "host_blocks": 4, "block_size": 4, field: value}
    with pytest.raises(ConfigError, match=message):
        CacheConfig(**kw)


def test_host_tier_may_be_empty():
    assert CacheConfig(model=MODEL, device_blocks=1, host_blocks=0).host_blocks == 0


@pytest.mark.parametrize("kw, message", [
    ({"num_layers": 0}, "num_layers must be positive"),
    ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"dtype_bytes": -2}, "dtype_bytes must be positive"),
])
def test_model_shape_refuses_bad_shapes(kw, message):
    base = {"name": "x", "num_layers": 1, "hidden_size": 8, "num_heads": 2, "num_kv_heads": 1,
            "intermediate_size": 16}
    with pytest.raises(ConfigError, match=message):
        ModelShape(**{**base, **kw})


def test_lora_shape_refuses_bad_rank_and_unknown_modules():
    with pytest.raises(ConfigError, match="rank must be positive"):
        LoraShape(rank=0)
    with pytest.raises(ConfigError, match="unknown LoRA target module 'lm_head'"):
        LoraShape(rank=8, target_modules=("q_proj", "lm_head"))
    with pytest.raises(ConfigError, match="must not be empty"):
        LoraShape(rank=8, target_modules=())
    with pytest.raises(ConfigError, match="unknown LoRA target module 'embed'"):
        MODEL.projection_dims("embed")


@pytest.mark.parametrize("kw", [
    {"low_watermark": 0.9, "high_watermark": 0.8},
    {"low_watermark": 0.0},
    {"high_watermark": 1.5},
    {"max_prefetch_blocks": -1},
])
def test_swapper_config_refuses_inverted_or_out_of_range_watermarks(kw):
    with pytest.raises(ConfigError, match="SwapperConfig"):
        SwapperConfig(**kw)


@pytest.mark.parametrize("kw", [
    {"h2d_bandwidth": 0.0}, {"disk_bandwidth": -1.0}, {"prefill_per_token": -1e-4},
])
def test_hardware_profile_refuses_non_positive_bandwidth_and_negative_costs(kw):
    with pytest.raises(ConfigError, match="HardwareProfile"):
        HardwareProfile(**kw)


def test_configs_are_frozen():
    cfg = make_cfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.device_blocks = 100  # type: ignore[misc]
