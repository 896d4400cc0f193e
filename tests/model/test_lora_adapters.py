"""PEFT adapter loading: scaling rules, and malformed or mismatched adapters rejected with
the file and the problem named. Fixture `llama`: see tinymodels.llama_setup."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import llama_setup

from fastlibra.model import AdapterLoadError, load_adapter, load_config
from fastlibra.model.lora import ArenaLayout

PREFIX = "base_model.model.model.layers"


@pytest.fixture
def llama(tmp_path_factory):
    return llama_setup(tmp_path_factory)


def test_scaling_rank_and_modules(llama):
    base, adapters, _ = llama
    cfg = load_config(base)
    a = load_adapter(adapters["a"], cfg, max_rank=16, device="cpu")
    b = load_adapter(adapters["b"], cfg, max_rank=16, device="cpu")
    c = load_adapter(adapters["c"], cfg, max_rank=16, device="cpu")
    assert (a.name, a.rank, a.scaling) == ("a", 8, 16 / 8)
    assert (b.rank, b.scaling) == (4, 8 / math.sqrt(4))  # rslora: alpha / sqrt(r)
    assert a.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert len(b.target_modules) == 7 and len(b.weights) == 14
    assert sorted(c.weights) == [(1, "down_proj"), (1, "gate_proj"), (1, "up_proj")]
    assert c.weights[(1, "down_proj")].a.shape == (16, 128)
    assert c.weights[(1, "down_proj")].b.shape == (64, 16)
    # The cache sizes an adapter by LoraShape; for full-layer adapters it is exact.
    assert a.shape(dtype_bytes=4).nbytes(cfg.shape()) == a.nbytes


@pytest.fixture
def adapter_copy(llama, tmp_path) -> tuple[Path, Path]:
    """A writable copy of adapter a (r=8 on q/k/v/o) and the base model directory."""
    base, adapters, _ = llama
    dst = tmp_path / "a"
    shutil.copytree(adapters["a"], dst)
    return base, dst


def _load(base: Path, d: Path, max_rank: int = 64, **kw):
    return load_adapter(d, load_config(base), max_rank=max_rank, device="cpu", **kw)


def _edit_config(d: Path, **changes) -> None:
    raw = json.loads((d / "adapter_config.json").read_text())
    raw.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(raw))


def _edit_weights(d: Path, edit) -> None:
    tensors = load_file(d / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, d / "adapter_model.safetensors")


def test_missing_adapter_config(adapter_copy):
    base, d = adapter_copy
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json: file not found"):
        _load(base, d)


def test_missing_weights_file(adapter_copy):
    base, d = adapter_copy
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors: file not found"):
        _load(base, d)


def test_wrong_shape(adapter_copy):
    base, d = adapter_copy

    def widen(t):
        t[f"{PREFIX}.1.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 96)
    _edit_weights(d, widen)
    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors: "
                                               r"layers.1.self_attn.q_proj.lora_A has shape "
                                               r"\(8, 96\), expected \(8, 64\)$"):
        _load(base, d)


def test_rank_disagreeing_with_config(adapter_copy):
    base, d = adapter_copy
    _edit_config(d, r=4)
    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors: layers.0.self_attn."
                                               r"k_proj.lora_A has shape \(8, 64\), "
                                               r"expected \(4, 64\)"):
        _load(base, d)


def test_unknown_target_module_in_config(adapter_copy):
    base, d = adapter_copy
    _edit_config(d, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json: unknown target "
                                               r"module\(s\) \['embed_tokens'\]"):
        _load(base, d)


def test_unexpected_tensor_in_weights(adapter_copy):
    base, d = adapter_copy

    def add_head(t):
        t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
    _edit_weights(d, add_head)
    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors: unexpected tensor "
                                               r"'base_model.model.lm_head.lora_A.weight'"):
        _load(base, d)


def test_tensor_for_a_module_not_in_target_modules(adapter_copy):
    base, d = adapter_copy

    def add_gate(t):
        t[f"{PREFIX}.0.mlp.gate_proj.lora_A.weight"] = torch.zeros(8, 64)
    _edit_weights(d, add_gate)
    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors: layers.0.mlp."
                                               r"gate_proj.lora_A: not a target"):
        _load(base, d)


def test_missing_tensor(adapter_copy):
    base, d = adapter_copy
    _edit_weights(d, lambda t: t.pop(f"{PREFIX}.1.self_attn.o_proj.lora_B.weight"))
    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors: missing "
                                               r"layers.1.self_attn.o_proj.lora_B$"):
        _load(base, d)


def test_rank_above_max(adapter_copy):
    base, d = adapter_copy
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json: rank r=8 is above the "
                                               r"configured max_lora_rank=4"):
        _load(base, d, max_rank=4)


def test_base_model_mismatch(adapter_copy):
    base, d = adapter_copy
    _edit_config(d, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json: base_model_name_or_path "
                                               r"'meta-llama/Llama-2-7b-hf' does not match"):
        _load(base, d)
    assert _load(base, d, check_base=False).rank == 8
    # Another copy of the same model (same directory name) is accepted.
    _edit_config(d, base_model_name_or_path=f"/elsewhere/{base.name}")
    assert _load(base, d).rank == 8


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, r"use_dora=True: DoRA adapters are not supported"),
    ({"bias": "all"}, r"bias='all': trained biases are not supported"),
    ({"rank_pattern": {"q_proj": 4}}, r"rank_pattern=.*per-module ranks"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=.*not supported"),
    ({"peft_type": "IA3"}, r"peft_type 'IA3' is not LORA"),
    ({"target_modules": r".*\.embed_tokens"},
     r"target_modules regex '\.\*\\\\.embed_tokens' matches none"),
    ({"layers_to_transform": [5]}, r"layers_to_transform \[5\] outside the base model's 2"),
])
def test_unsupported_features(adapter_copy, change, message):
    base, d = adapter_copy
    _edit_config(d, **change)
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json: " + message):
        _load(base, d)


def test_regex_target_modules_follow_peft(adapter_copy):
    """PEFT full-matches a string against module names: this one is adapter a's q/k/v/o."""
    base, d = adapter_copy
    _edit_config(d, target_modules=r".*\.self_attn\.(q|k|v|o)_proj")
    assert _load(base, d).target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    _edit_config(d, target_modules=r".*\.(q|k)_proj")
    with pytest.raises(AdapterLoadError, match=r"layers.0.self_attn.o_proj.lora_A: not a "
                                               r"target of adapter_config.json"):
        _load(base, d)


def test_malformed_config_and_weights(adapter_copy):
    base, d = adapter_copy
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors: not a readable"):
        _load(base, d)
    (d / "adapter_config.json").write_text("[1, 2")
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json: malformed JSON"):
        _load(base, d)


@pytest.mark.parametrize("block_elems", [4096, 1000, 200])
def test_arena_layout_round_trips_every_weight_exactly(llama, block_elems):
    """Packed into blocks of any size (a 200-element block holds one rank row of the MLP
    at most: its matrices are split along the rank), the parts multiply out to the same
    update as A and B, and every part is a view of a single block."""
    base, adapters, _ = llama
    cfg = load_config(base)
    b = load_adapter(adapters["b"], cfg, max_rank=16, device="cpu")
    layout = ArenaLayout(b, block_elems)
    arena = torch.full((layout.num_blocks, block_elems), float("nan"))
    layout.write(b, list(arena))
    parts = layout.views(list(arena))
    assert sorted(parts) == sorted(b.weights)
    for key, w in b.weights.items():
        update = sum(bt.T @ a for a, bt in parts[key])  # [out, in]
        torch.testing.assert_close(update, w.b @ w.a, atol=1e-6, rtol=1e-6)
        for a, bt in parts[key]:
            for t in (a, bt):
                assert t.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
    used = sum(c.rows * (c.fan_in + c.fan_out) for c in layout.chunks)
    assert used == b.nbytes // 4  # every element once, no padding inside a chunk
    if block_elems == 200:
        assert max(len(p) for p in parts.values()) == b.rank  # one row per block
    with pytest.raises(ValueError, match="use a larger block size"):
        ArenaLayout(b, 150)  # a gate_proj row (64 + 128) does not fit
