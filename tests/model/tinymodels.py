"""Tiny random Hugging Face models and PEFT adapters, written to disk by the real
libraries, and reference logits from transformers + peft on the same files.

    model: 2 layers, hidden 64, 4 query heads / 2 KV heads of width 16 (GQA),
           intermediate 128, vocab 128, fp32
    arena: block_size 4, blocks handed out in a scrambled order so paging is exercised
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from fastlibra.model import KVCache, ModelRunner, load_adapter, load_model

# Tiny matmuls gain nothing from intra-op threads, and on a shared 2-core box OpenMP
# spin-waiting makes them ~10x slower (27 s instead of 3 s for tests/model).
torch.set_num_threads(1)

DEVICE = os.environ.get("FASTLIBRA_TEST_DEVICE", "cpu")
"""Where the model runner and the engine of tests/model run: `FASTLIBRA_TEST_DEVICE=cuda`
runs the correctness tests on a GPU (scripts/gpu_check.sh); references stay on the CPU."""

BS = 4
VOCAB = 128
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


@contextmanager
def quiet():
    """peft 0.21 calls a transformers 5.24 method that transformers marks deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        yield


def make_model(path: Path, kind: str = "llama", seed: int = 0, shard: str | None = None,
               **overrides) -> Path:
    """Save a random `kind` model to `path` (sharded when `shard` is a max_shard_size)."""
    torch.manual_seed(seed)
    cfg = CONFIGS[kind](**{**SHAPE, **overrides})
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # visible norms and biases, not the ones/zeros of init
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def hf_model(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_adapter(base: Path, path: Path, r: int = 8, alpha: float = 16, seed: int = 1,
                 targets=("q_proj", "k_proj", "v_proj", "o_proj"), **lora_kw) -> Path:
    """A PEFT LoRA of `base` with random (non-zero) A and B, saved to `path`."""
    torch.manual_seed(seed)
    with quiet():
        model = get_peft_model(hf_model(base), LoraConfig(
            r=r, lora_alpha=alpha, target_modules=list(targets) if not isinstance(targets, str)
            else targets, lora_dropout=0.0, **lora_kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


class Reference:
    """transformers (+ peft) logits of whole sequences, one adapter at a time."""

    def __init__(self, base: Path, adapters: dict[str, Path]) -> None:
        self.plain = hf_model(base)
        self.peft: PeftModel | None = None
        for name, path in adapters.items():
            with quiet():
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(hf_model(base), path,
                                                          adapter_name=name)
                else:
                    self.peft.load_adapter(path, adapter_name=name)
        if self.peft is not None:
            self.peft.eval()

    def model(self, adapter: str | None):
        if adapter is None:
            return self.plain
        assert self.peft is not None
        self.peft.set_adapter(adapter)
        return self.peft

    @torch.no_grad()
    def logits(self, tokens: list[int], adapter: str | None) -> torch.Tensor:
        """[len(tokens), vocab]"""
        return self.model(adapter)(torch.tensor([tokens])).logits[0]

    @torch.no_grad()
    def greedy(self, tokens: list[int], adapter: str | None, n: int) -> list[int]:
        out = self.model(adapter).generate(torch.tensor([tokens]), max_new_tokens=n,
                                           do_sample=False, attention_mask=None)
        return out[0, len(tokens):].tolist()


def runner(base: Path, adapters: dict[str, Path] | None = None, num_blocks: int = 64,
           max_rank: int = 64, dtype=torch.float32) -> ModelRunner:
    weights = load_model(base, dtype=dtype, device=DEVICE)
    r = ModelRunner(weights, KVCache(weights.config, num_blocks, BS, dtype, DEVICE))
    for name, path in (adapters or {}).items():
        r.add_adapter(load_adapter(path, weights.config, max_rank=max_rank, name=name,
                                   dtype=dtype, device=DEVICE))
    return r


class Blocks:
    """Hands out arena blocks in a scrambled but fixed order (never 0, 1, 2, ...)."""

    def __init__(self, num_blocks: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        out, self.free = self.free[:n], self.free[n:]
        return out

    def table(self, ntokens: int) -> list[int]:
        return self.take(-(-ntokens // BS))


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
               "rope_theta": 500000.0}


_BUILT: dict[str, tuple] = {}


def llama_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Reference]:
    """A Llama 3 style model (GQA, llama3 rope scaling) with three adapters, built once per
    session (each test module wraps this in its own `llama` fixture):
    a: r=8 on q/k/v/o; b: r=4 rslora on every projection; c: r=16 on the MLP, layer 1 only."""
    if "llama" in _BUILT:
        return _BUILT["llama"]
    root = tmp_path_factory.mktemp("llama")
    base = make_model(root / "base", "llama", rope_parameters=LLAMA3_ROPE)
    adapters = {
        "a": make_adapter(base, root / "a", r=8, alpha=16, seed=1),
        "b": make_adapter(base, root / "b", r=4, alpha=8, seed=2, targets="all-linear",
                          use_rslora=True),
        "c": make_adapter(base, root / "c", r=16, alpha=8, seed=3,
                          targets=("gate_proj", "up_proj", "down_proj"),
                          layers_to_transform=[1]),
    }
    _BUILT["llama"] = (base, adapters, Reference(base, adapters))
    return _BUILT["llama"]
