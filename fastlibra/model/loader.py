"""Load a Hugging Face Llama-family model directory into plain tensors we own.

    <dir>/config.json                       architecture (Llama 2/3, Mistral, Qwen2)
    <dir>/model.safetensors                 one file, or
    <dir>/model.safetensors.index.json      {"weight_map": {tensor name: shard file}}
    <dir>/model-0000i-of-0000n.safetensors  shards

Only safetensors are read (no pickle). The forward pass lives in `forward.py`;
transformers is never imported here. Every error names the file it is about.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fastlibra.config import ModelShape

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE = ("default", "linear", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model directory is missing a file or holds something we cannot serve."""


def _fail(file: Path | str, msg: str) -> ModelLoadError:
    return ModelLoadError(f"{file}: {msg}")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"dtype {dtype} not supported; use one of {list(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} not supported; use one of {list(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base frequency and the (static) context-extension rule."""

    theta: float = 10000.0
    kind: str = "default"
    """"default", "linear" (positions / factor) or "llama3" (per-band smoothing)."""
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """[head_dim // 2] float32 angular frequencies, as transformers computes them."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv = 1.0 / (self.theta ** exponents)
        if self.kind == "linear":
            return inv / self.factor
        if self.kind == "llama3":
            old = self.original_max_position_embeddings
            low_wavelen = old / self.low_freq_factor
            high_wavelen = old / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


@dataclass(frozen=True)
class ModelConfig:
    """What the forward pass needs to know about the architecture (from config.json)."""

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    """Per layer: attend only to the last `w` positions (Mistral, some Qwen2 layers)."""
    names: tuple[str, ...] = ()
    """Names this model answers to (directory, `_name_or_path`): adapters whose
    `base_model_name_or_path` is none of these are rejected."""
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_attention_heads={self.num_heads} is not a multiple of "
                                 f"num_key_value_heads={self.num_kv_heads}")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)

    def projection_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a linear layer inside a decoder layer."""
        return self.shape().projection_dims(module)

    def shape(self, dtype_bytes: int = 2) -> ModelShape:
        """The cache-sizing view of this model (KV bytes per token, adapter sizes)."""
        return ModelShape(self.names[0] if self.names else self.arch, self.num_layers,
                          self.hidden_size, self.num_heads, self.num_kv_heads,
                          self.intermediate_size, dtype_bytes=dtype_bytes,
                          head_dim=self.head_dim, vocab_size=self.vocab_size,
                          tied_embeddings=self.tie_word_embeddings)


def _parse_rope(raw: dict, file: Path) -> RopeConfig:
    # transformers >= 5 writes "rope_parameters" (with rope_theta inside); older files
    # write "rope_theta" at the top level and "rope_scaling" with "type" or "rope_type".
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise _fail(file, f"rope_parameters/rope_scaling must be an object, got {params!r}")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        why = (" (its frequencies depend on the current sequence length, so keys cached "
               "with earlier frequencies would disagree)" if kind == "dynamic" else "")
        raise _fail(file, f"rope type {kind!r} not supported{why}; supported: "
                          f"{list(SUPPORTED_ROPE)}")
    if raw.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _fail(file, "partial_rotary_factor != 1 is not supported")
    kw: dict = {"theta": theta, "kind": kind}
    if kind in ("linear", "llama3"):
        if "factor" not in params:
            raise _fail(file, f"rope type {kind!r} needs a 'factor'")
        kw["factor"] = float(params["factor"])
    if kind == "llama3":
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in params:
                raise _fail(file, f"rope type 'llama3' needs {k!r}")
        kw["low_freq_factor"] = float(params["low_freq_factor"])
        kw["high_freq_factor"] = float(params["high_freq_factor"])
        kw["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**kw)


def _sliding_windows(raw: dict, arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    types = raw.get("layer_types")
    if types is not None:
        return tuple(window if t == "sliding_attention" else None for t in types)
    if arch == "mistral":
        return (window,) * num_layers
    if arch == "qwen2" and raw.get("use_sliding_window"):
        start = raw.get("max_window_layers", num_layers)
        return tuple(window if i >= start else None for i in range(num_layers))
    return (None,) * num_layers


def parse_config(raw: dict, file: Path | str, names: tuple[str, ...] = ()) -> ModelConfig:
    """A `ModelConfig` from the dict of a config.json; errors name `file`."""
    file = Path(file)
    arch = raw.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise _fail(file, f"model_type {arch!r} not supported; supported: {list(SUPPORTED_ARCHS)}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise _fail(file, f"hidden_act {act!r} not supported (only 'silu')")
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        num_layers = int(raw["num_hidden_layers"])
        kw = dict(
            arch=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            intermediate_size=int(raw["intermediate_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        )
    except KeyError as e:
        raise _fail(file, f"missing required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise _fail(file, f"malformed value: {e}") from None
    attention_bias = bool(raw.get("attention_bias") or False)
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    name = raw.get("_name_or_path")
    return ModelConfig(
        **kw,
        rope=_parse_rope(raw, file),
        qkv_bias=attention_bias or arch == "qwen2",
        o_bias=attention_bias,
        mlp_bias=bool(raw.get("mlp_bias") or False),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_windows=_sliding_windows(raw, arch, num_layers),
        names=names + ((name,) if name and name not in names else ()),
        eos_token_ids=eos_ids,
    )


@dataclass
class LayerWeights:
    """One decoder layer; linear weights are [out_features, in_features] as in PyTorch."""

    input_norm: torch.Tensor  # [hidden]
    q_proj: torch.Tensor  # [num_heads * head_dim, hidden]
    k_proj: torch.Tensor  # [num_kv_heads * head_dim, hidden]
    v_proj: torch.Tensor  # [num_kv_heads * head_dim, hidden]
    o_proj: torch.Tensor  # [hidden, num_heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_proj: torch.Tensor  # [intermediate, hidden]
    up_proj: torch.Tensor  # [intermediate, hidden]
    down_proj: torch.Tensor  # [hidden, intermediate]
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    """Module name -> [out_features] bias, only for modules that have one."""


@dataclass
class ModelWeights:
    config: ModelConfig
    embed_tokens: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the same tensor as embed_tokens when tied
    dtype: torch.dtype
    device: torch.device
    path: Path


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, for every tensor the forward pass reads."""
    h = cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h),
                                       "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for m in _ATTN + _MLP:
            fan_in, fan_out = cfg.projection_dims(m)
            sub = "self_attn" if m in _ATTN else "mlp"
            out[f"{p}{sub}.{m}.weight"] = (fan_out, fan_in)
            has_bias = ((m in ("q_proj", "k_proj", "v_proj") and cfg.qkv_bias)
                        or (m == "o_proj" and cfg.o_bias) or (m in _MLP and cfg.mlp_bias))
            if has_bias:
                out[f"{p}{sub}.{m}.bias"] = (fan_out,)
    return out


def _weight_files(root: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (from the index when sharded)."""
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise _fail(index, f"malformed index ({e}); expected {{'weight_map': {{...}}}}") from None
        if not isinstance(weight_map, dict):
            raise _fail(index, "'weight_map' must map tensor names to file names")
        out = {}
        for name, fname in weight_map.items():
            f = root / fname
            if not f.exists():
                raise _fail(index, f"shard {fname!r} (holding {name!r}) does not exist")
            out[name] = f
        return out
    files = sorted(root.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in root.glob("*.bin"))
        hint = f" (found {bins}: only safetensors are supported)" if bins else ""
        raise _fail(root, f"no model.safetensors or model.safetensors.index.json{hint}")
    if len(files) > 1:
        raise _fail(root, f"{len(files)} safetensors files but no "
                          "model.safetensors.index.json to say which tensor is where")
    return {name: files[0] for name in _keys(files[0])}


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise _fail(file, f"not a readable safetensors file ({e})") from None


def read_json(file: Path) -> dict:
    if not file.exists():
        raise _fail(file, "file not found")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise _fail(file, f"malformed JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _fail(file, "expected a JSON object")
    return raw


def load_config(path: str | Path) -> ModelConfig:
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: model directory not found")
    return parse_config(read_json(root / "config.json"), root / "config.json",
                        names=(str(root), str(root.resolve()), root.name))


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str | None = None) -> ModelWeights:
    """Read config.json and the safetensors weights of a model directory onto `device`
    (default: cuda when available, else cpu) in `dtype`, checking every name and shape."""
    root = Path(path)
    cfg = load_config(root)
    dtype = resolve_dtype(dtype)
    device = torch.device(device) if device is not None else default_device()
    where = _weight_files(root)
    expected = expected_tensors(cfg)
    missing = [n for n in expected if n not in where]
    if missing:
        files = sorted({p.name for p in where.values()}) or [root.name]
        raise _fail(root / files[0] if len(files) == 1 else root,
                    f"missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                    f"({len(missing)} in all)")
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(where[name], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise _fail(file, f"tensor {name!r} listed in the index is not in the file")
                    t = f.get_tensor(name)
                    if tuple(t.shape) != expected[name]:
                        raise _fail(file, f"{name} has shape {tuple(t.shape)}, "
                                          f"expected {expected[name]}")
                    tensors[name] = t.to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise _fail(file, f"not a readable safetensors file ({e})") from None
    return _assemble(cfg, tensors, dtype, device, root)


def _assemble(cfg: ModelConfig, t: dict[str, torch.Tensor], dtype: torch.dtype,
              device: torch.device, root: Path) -> ModelWeights:
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        w = {m: t[f"{p}{'self_attn' if m in _ATTN else 'mlp'}.{m}.weight"] for m in _ATTN + _MLP}
        biases = {m: t[f"{p}{'self_attn' if m in _ATTN else 'mlp'}.{m}.bias"]
                  for m in _ATTN + _MLP
                  if f"{p}{'self_attn' if m in _ATTN else 'mlp'}.{m}.bias" in t}
        layers.append(LayerWeights(input_norm=t[p + "input_layernorm.weight"],
                                   post_norm=t[p + "post_attention_layernorm.weight"],
                                   biases=biases, **w))
    embed = t["model.embed_tokens.weight"]
    return ModelWeights(config=cfg, embed_tokens=embed, layers=layers,
                        norm=t["model.norm.weight"],
                        lm_head=embed if cfg.tie_word_embeddings else t["lm_head.weight"],
                        dtype=dtype, device=device, path=root)
