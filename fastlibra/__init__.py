"""FASTLIBRA: multi-LoRA LLM serving with a unified LoRA/KV cache."""

__version__ = "0.1.0"
