"""The model runner: Hugging Face Llama-family weights, PEFT LoRA adapters and a
paged-KV, multi-adapter forward pass, all in plain torch (no transformers at run time)."""

from fastlibra.model.forward import KVCache, ModelRunner, SeqInput
from fastlibra.model.loader import (
    ModelConfig,
    ModelLoadError,
    ModelWeights,
    RopeConfig,
    load_config,
    load_model,
)
from fastlibra.model.lora import AdapterLoadError, LoraAdapter, load_adapter

__all__ = [
    "AdapterLoadError", "KVCache", "LoraAdapter", "ModelConfig", "ModelLoadError",
    "ModelRunner", "ModelWeights", "RopeConfig", "SeqInput", "load_adapter", "load_config",
    "load_model",
]
