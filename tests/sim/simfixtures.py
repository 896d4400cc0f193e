"""Small hand-made workloads for engine and simulator tests (no generator involved), and a
user's own model directory and hardware file for the simulator."""

import json
import random
from dataclasses import asdict

from fastlibra.engine.request import Request


def chat_sessions(num_sessions=40, num_adapters=6, rate=2.0, seed=0, turns=(1, 4),
                  user=(20, 200), answer=(10, 120), think=5.0) -> list[Request]:
    """Multi-turn sessions: each turn's prompt = previous prompt + answer + new message."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for s in range(num_sessions):
        t += rng.expovariate(rate)
        a = rng.randrange(num_adapters)
        history = [random.Random(a).randrange(32000) for _ in range(64)]
        first = prev = None
        for k in range(rng.randint(*turns)):
            history = history + [rng.randrange(32000) for _ in range(rng.randint(*user))]
            answer_tokens = [rng.randrange(32000) for _ in range(rng.randint(*answer))]
            r = Request(f"s{s}t{k}", history, len(answer_tokens), arrival=t,
                        adapter=f"lora-{a}", output=answer_tokens, think_s=think)
            if prev is None:
                first = r
            else:
                prev.next_turn = r
            prev = r
            history = history + answer_tokens
        out.append(first)
    return out


def llama_2_7b_dir(root):
    """config.json of a Llama-2 7B shape under root/my-llama, written by transformers (no
    weights: the simulator reads only the config)."""
    from transformers import LlamaConfig

    path = root / "my-llama"
    LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, intermediate_size=11008,
                vocab_size=32000).save_pretrained(path)
    return path


def a100_file(root):
    """root/my-gpu.json: the table's A100 data sheet, without a name (the file's stem is)."""
    from fastlibra.sim.profiles import GPUS

    gpu = asdict(GPUS["a100-80g"])
    del gpu["name"]
    path = root / "my-gpu.json"
    path.write_text(json.dumps(gpu))
    return path
