"""Loading a model directory: config parsing, sharded weights, dtypes, and errors that
name the file at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import BS, make_model

from fastlibra.config import CacheConfig
from fastlibra.model import KVCache, ModelLoadError, load_config, load_model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return (make_model(root / "single", "llama", seed=3),
            make_model(root / "sharded", "llama", seed=3, shard="30KB"))


def test_sharded_and_single_file_load_the_same_tensors(dirs):
    single, sharded = dirs
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a, b = load_model(single, device="cpu"), load_model(sharded, device="cpu")
    assert a.config.num_layers == 2 and a.config.num_kv_heads == 2 and a.config.head_dim == 16
    assert torch.equal(a.embed_tokens, b.embed_tokens)
    assert torch.equal(a.lm_head, b.lm_head)
    for la, lb in zip(a.layers, b.layers, strict=True):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(la, m), getattr(lb, m))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", torch.float16])
def test_dtype_is_selectable(dirs, dtype):
    w = load_model(dirs[0], dtype=dtype, device="cpu")
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert w.dtype == want and w.layers[1].q_proj.dtype == want and w.device.type == "cpu"


def test_cache_sizing_view_matches_the_arena(dirs):
    """ModelConfig.shape() is what CacheConfig sizes blocks with; the arena agrees."""
    cfg = load_config(dirs[0])
    cache = CacheConfig(model=cfg.shape(dtype_bytes=2), device_blocks=8, host_blocks=0,
                        block_size=BS)
    kv = KVCache(cfg, 8, BS, torch.bfloat16, "cpu")
    assert kv.block_bytes == cache.block_bytes == 2 * 2 * BS * 2 * 16 * 2
    assert kv.k(1).shape == (8, BS, 2, 16)


def test_shape_counts_the_parameters_the_file_holds(dirs):
    """The simulator's step time reads body / output-projection parameters from the shape:
    they must add up to what transformers counts for the same directory."""
    from tinymodels import hf_model

    cfg, shape = load_config(dirs[0]), load_config(dirs[0]).shape()
    assert shape.vocab_size == cfg.vocab_size
    assert shape.num_params == sum(p.numel() for p in hf_model(dirs[0]).parameters())


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    raw = json.loads((d / "config.json").read_text())
    raw.update(changes)
    (d / "config.json").write_text(json.dumps(raw))


def test_missing_config(dirs, tmp_path):
    d = _copy(dirs[0], tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config.json: file not found"):
        load_model(d, device="cpu")


def test_malformed_config(dirs, tmp_path):
    d = _copy(dirs[0], tmp_path)
    (d / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match=r"config.json: malformed JSON"):
        load_model(d, device="cpu")
    d = _copy(dirs[1], tmp_path / "x")
    raw = json.loads((d / "config.json").read_text())
    del raw["intermediate_size"]
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=r"config.json: missing required key "
                                             r"'intermediate_size'"):
        load_model(d, device="cpu")


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, r"model_type 'gpt2' not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     r"rope type 'dynamic' not supported \(its frequencies depend"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
     r"rope type 'llama3' needs 'low_freq_factor'"),
])
def test_unsupported_architecture(dirs, tmp_path, change, message):
    d = _copy(dirs[0], tmp_path)
    _edit_config(d, **change)
    with pytest.raises(ModelLoadError, match=r"config.json: " + message):
        load_model(d, device="cpu")


def test_legacy_rope_keys_are_read():
    """transformers < 5 files: rope_theta at the top, rope_scaling with "type"."""
    from fastlibra.model.loader import parse_config

    raw = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 16, "rope_theta": 500000.0,
           "rope_scaling": {"type": "linear", "factor": 2.0}}
    rope = parse_config(raw, "config.json").rope
    assert (rope.kind, rope.theta, rope.factor) == ("linear", 500000.0, 2.0)


def test_missing_shard(dirs, tmp_path):
    d = _copy(dirs[1], tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=r"model.safetensors.index.json: shard "
                                             rf"'{shard.name}' \(holding 'model\."):
        load_model(d, device="cpu")


def test_wrong_tensor_shape(dirs, tmp_path):
    d = _copy(dirs[0], tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model.safetensors: model.layers.1.self_attn."
                                             r"k_proj.weight has shape \(48, 64\), "
                                             r"expected \(32, 64\)"):
        load_model(d, device="cpu")


def test_missing_tensor_and_missing_weights(dirs, tmp_path):
    d = _copy(dirs[0], tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model.safetensors: missing tensors "
                                             r"\['model.norm.weight'\]"):
        load_model(d, device="cpu")
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match=r"model.safetensors: not a readable safetensors"):
        load_model(d, device="cpu")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model.safetensors or "
                                             r"model.safetensors.index.json"):
        load_model(d, device="cpu")
