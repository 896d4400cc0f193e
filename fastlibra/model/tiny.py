"""A tiny random Llama, a tokenizer with a chat template and PEFT LoRA adapters, written
to disk so the real engine can serve them without downloading anything.

    <root>/base/      config.json, model.safetensors (transformers, random weights),
                      tokenizer.json + tokenizer_config.json + chat_template.jinja
    <root>/lora-{i}/  adapter_config.json + adapter_model.safetensors, PEFT's format
                      written directly (peft is a test-only dependency)

    tokenizer  word level, split on whitespace:
               <pad>=0 <s>=1 </s>=2 (eos) <system>=3 <user>=4 <assistant>=5,
               then the words w6 .. w{vocab-1} = ids 6 .. vocab-1 ("w7 w42" <-> [7, 42])
    chat       "<s> <user> w7 w42 <assistant>": each message is its role token and its
               text, the generation prompt is <assistant>
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ROLES = ("system", "user", "assistant")
SPECIALS = ("<pad>", "<s>", "</s>") + tuple(f"<{r}>" for r in ROLES)
FIRST_WORD = len(SPECIALS)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %} <{{ message['role'] }}> {{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} <assistant>{% endif %}"
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TINY_SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=688,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=2048)
"""`bench replay`'s model: GQA 8/2, ~7 ms per decode step on one CPU core in float32."""
LORA_SCALE = 0.02
"""Standard deviation of A and B: both non-zero, so every adapter changes the outputs."""


def word(token_id: int) -> str:
    return f"w{token_id}"


def build_tiny_model(root: Path, *, num_adapters: int = 4, ranks: tuple[int, ...] = (8, 16),
                     seed: int = 0, dtype: torch.dtype = torch.float32,
                     byte_tokenizer: bool = False, **shape) -> tuple[Path, dict[str, Path]]:
    """Write the model (its weights in `dtype`) and `num_adapters` float32 adapters
    (adapter i has rank ranks[i % len]) under `root`; `shape` overrides `TINY_SHAPE`
    (LlamaConfig keywords). `byte_tokenizer`: `save_byte_tokenizer`'s instead of the word
    tokenizer (for structured output; vocab_size >= BYTE_VOCAB). Same seed, same files."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**TINY_SHAPE, **shape}, bos_token_id=1, eos_token_id=2)
    if cfg.vocab_size <= FIRST_WORD:
        raise ValueError(f"vocab_size must be above {FIRST_WORD} (the special tokens)")
    torch.manual_seed(seed)
    base = root / "base"
    AutoModelForCausalLM.from_config(cfg, dtype=dtype).save_pretrained(
        base, safe_serialization=True)
    if byte_tokenizer:
        if save_byte_tokenizer(base) > cfg.vocab_size:
            raise ValueError(f"the byte tokenizer needs vocab_size >= {BYTE_VOCAB}")
    else:
        save_tokenizer(base, cfg.vocab_size)
    gen = torch.Generator().manual_seed(seed + 1)
    adapters: dict[str, Path] = {}
    for i in range(num_adapters):
        name = f"lora-{i}"
        adapters[name] = save_lora(root / name, base, cfg, ranks[i % len(ranks)], gen)
    return base, adapters


def save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab |= {word(i): i for i in range(FIRST_WORD, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>",
                                   additional_special_tokens=list(SPECIALS[3:]))
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


BYTE_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c.function | tojson }}</tool_call>"
    "{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
"""Tools (OpenAI's form) as a system line, and earlier calls in hermes tags, as Qwen2's
template writes them."""


BYTE_ROLES = tuple(f"<|{r}|>" for r in (*ROLES, "tool"))
BYTE_VOCAB = 3 + 256 + len(BYTE_ROLES)
"""Size of `save_byte_tokenizer`'s vocabulary."""


def save_byte_tokenizer(path: Path) -> int:
    """A byte-level tokenizer (GPT-2's byte alphabet, no merges): any text, JSON
    included, is a sequence of its tokens, so grammars can constrain it (the word
    tokenizer has no '{'). <pad>=0 <s>=1 </s>=2 (eos), bytes 3..258, then role tokens.
    Returns its size (BYTE_VOCAB); a larger model vocabulary has ids that decode to ""."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    roles = list(BYTE_ROLES)
    vocab = {t: i for i, t in enumerate([*SPECIALS[:3], *alphabet, *roles])}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=roles)
    fast.chat_template = BYTE_CHAT_TEMPLATE
    fast.save_pretrained(path)
    return len(vocab)


def save_lora(path: Path, base: Path, cfg, rank: int, gen: torch.Generator) -> Path:
    """One LoRA on q/k/v/o of every layer, as `PeftModel.save_pretrained` lays it out:
    A [r, in] and B [out, r] per projection, lora_alpha = 2r (scaling 2)."""
    head_dim = cfg.head_dim
    dims = {"q_proj": (cfg.hidden_size, cfg.num_attention_heads * head_dim),
            "k_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
            "v_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
            "o_proj": (cfg.num_attention_heads * head_dim, cfg.hidden_size)}
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for module, (fan_in, fan_out) in dims.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = LORA_SCALE * torch.randn(rank, fan_in, generator=gen)
            tensors[f"{key}.lora_B.weight"] = LORA_SCALE * torch.randn(fan_out, rank, generator=gen)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": list(TARGETS),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path
