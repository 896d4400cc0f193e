"""A tiny model directory the `LLM` API can serve end to end: random Llama weights
(tinymodels.SHAPE: vocab 128, context 256), a word-level tokenizer saved beside them so
text round-trips, and two PEFT adapters.

    tokenizer: <pad>=0 <s>=1 </s>=2 (eos), then the words w003 .. w127 = ids 3 .. 127;
               "w005 w017" <-> [5, 17]  (fixed-width words: no word is inside another)
    chat template: system -> "w010 <content>", user -> "w011 <content>",
               assistant -> "w012 <content>"; the generation prompt is "w012"
    adapters:  a: r=8 on q/k/v/o;  b: r=4 on every projection
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import VOCAB, Reference, make_adapter, make_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def word(i: int) -> str:
    return f"w{i:03d}"


CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}w010 {% elif m['role'] == 'user' %}w011 "
    "{% else %}w012 {% endif %}{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w012{% endif %}")


def save_word_tokenizer(path: Path) -> None:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {word(i): i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def text(ids: list[int]) -> str:
    return " ".join(word(i) for i in ids)


_BUILT: dict[str, tuple] = {}


def served_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Reference]:
    """(model dir, {adapter name: dir}, transformers+peft reference), built once."""
    if "served" not in _BUILT:
        root = tmp_path_factory.mktemp("served")
        base = make_model(root / "base", "llama", seed=11)
        save_word_tokenizer(base)
        adapters = {"a": make_adapter(base, root / "a", r=8, alpha=16, seed=12),
                    "b": make_adapter(base, root / "b", r=4, alpha=8, seed=13,
                                      targets="all-linear")}
        _BUILT["served"] = (base, adapters, Reference(base, adapters))
    return _BUILT["served"]


BYTE_SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
"""A random Llama whose tokenizer is byte level (fastlibra.model.tiny.save_byte_tokenizer):
JSON, regexes and tool-call tags can be written in its tokens."""


def byte_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(model dir, {"lora-0": dir}) of the byte-tokenizer model, built once."""
    if "bytes" not in _BUILT:
        from fastlibra.model.tiny import build_tiny_model

        root = tmp_path_factory.mktemp("bytes")
        _BUILT["bytes"] = build_tiny_model(root, num_adapters=1, byte_tokenizer=True,
                                           seed=5, **BYTE_SHAPE)
    return _BUILT["bytes"]
