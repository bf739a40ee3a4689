"""Model configuration: one frozen dataclass, readable from HF `config.json` and ConfigDicts."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from ir_jax.base_error import IrJaxError

# Upper bounds that no real Llama comes near; they stop a hostile or mistyped
# config from asking for terabytes before anything is validated.
_MAX_VOCAB = 4_000_000
_MAX_HIDDEN = 131_072
_MAX_LAYERS = 1_024
_MAX_HEADS = 4_096

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(IrJaxError, ValueError):
  """A configuration value is missing, malformed or out of range."""


GCSFUSE_HINT = (
  "mount the bucket with gcsfuse and pass the mounted path (launch/tpu_pod.sh "
  "runs `gcsfuse --implicit-dirs BUCKET ~/gcs` on every worker: gs://BUCKET/X "
  "is then ~/gcs/X)"
)


def refuse_remote(what: str, path: Any) -> None:
  """One line for a gs:// (or any URL) path: every reader and writer here is local-file
  based (orbax/TFDS would take gs:// but the text readers, tokenizer, GGUF/safetensors
  and JSON writers would not), so a bucket is used through its gcsfuse mount."""
  if isinstance(path, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path):
    raise ConfigError(f"{what} {path}: URL paths are not read directly; {GCSFUSE_HINT}")


_F32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32


def is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  """A finite int or float (bools are not numbers here)."""
  if isinstance(v, bool):
    return False
  if isinstance(v, int):
    try:
      float(v)  # ints beyond float range (10**400) are not finite numbers either
    except OverflowError:
      return False
    return True
  return isinstance(v, float) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes and numerics of a Llama-family decoder (HF field meanings)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int = 0  # 0: hidden_size // num_heads
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10_000.0
  # None, or a dict with rope_type in _ROPE_TYPES and that type's fields
  # (llama3: factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings; linear: factor).
  rope_scaling: Mapping[str, Any] | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  pad_token_id: int | None = None
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: bool = False
  # Routing modules (shapes, so they live with the model): forecaster rank r
  # (d -> r -> d) and router hidden width (0: a linear router).
  lff_rank: int = 100
  router_hidden: int = 128
  # LoRA adapters on q, v and the MLP gate projection (0: none); the update
  # is scaled by lora_alpha / lora_rank. Merged into the base weights on export.
  lora_rank: int = 0
  lora_alpha: float = 32.0

  def __post_init__(self) -> None:
    if (
      self.head_dim == 0
      and is_int(self.num_heads)
      and self.num_heads > 0
      and is_int(self.hidden_size)
    ):
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.rope_scaling is not None:
      if not isinstance(self.rope_scaling, Mapping):
        raise ConfigError(
          f"model.rope_scaling must be None or a dict with a rope_type, got {self.rope_scaling!r}"
        )
      object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
    self.validate()

  # ---------------------------------------------------------------- checks
  def validate(self) -> None:
    """Raises ConfigError naming the field, the value and what is expected."""

    def positive(name: str, limit: int) -> None:
      v = getattr(self, name)
      if not is_int(v) or not 0 < v <= limit:
        raise ConfigError(f"model.{name} must be an integer in [1, {limit}], got {v!r}")

    positive("vocab_size", _MAX_VOCAB)
    positive("hidden_size", _MAX_HIDDEN)
    positive("intermediate_size", 8 * _MAX_HIDDEN)
    positive("num_layers", _MAX_LAYERS)
    positive("num_heads", _MAX_HEADS)
    positive("num_kv_heads", _MAX_HEADS)
    positive("head_dim", _MAX_HIDDEN)
    positive("max_position_embeddings", 1 << 24)
    positive("lff_rank", _MAX_HIDDEN)
    if not is_int(self.router_hidden) or not 0 <= self.router_hidden <= _MAX_HIDDEN:
      raise ConfigError(
        f"model.router_hidden must be an integer in [0, {_MAX_HIDDEN}] (0: linear router), "
        f"got {self.router_hidden!r}"
      )
    if not is_int(self.lora_rank) or not 0 <= self.lora_rank <= _MAX_HIDDEN:
      raise ConfigError(
        f"model.lora_rank must be an integer in [0, {_MAX_HIDDEN}] (0: no LoRA), "
        f"got {self.lora_rank!r}"
      )
    if not (is_number(self.lora_alpha) and self.lora_alpha > 0):
      raise ConfigError(f"model.lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
        f"model.num_heads ({self.num_heads}) must be a multiple of "
        f"model.num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
      )
    if self.head_dim % 2:
      raise ConfigError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
    # float32 must hold eps (a smaller one rounds to 0: a zero-norm row divides by zero).
    if not (is_number(self.rms_norm_eps) and _F32_TINY <= self.rms_norm_eps < 1):
      raise ConfigError(
        f"model.rms_norm_eps must be a number in [{_F32_TINY:.3g}, 1), got {self.rms_norm_eps!r}"
      )
    if not (is_number(self.rope_theta) and self.rope_theta > 1):
      raise ConfigError(f"model.rope_theta must be a finite number > 1, got {self.rope_theta!r}")
    for name in ("dtype", "param_dtype"):
      v = getattr(self, name)
      if not isinstance(v, str) or v not in _DTYPES:
        raise ConfigError(f"model.{name} must be one of {sorted(_DTYPES)}, got {v!r}")
    for name in ("tie_word_embeddings", "scan_layers", "remat"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"model.{name} must be True or False, got {getattr(self, name)!r}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
      v = getattr(self, name)
      if v is not None and not (is_int(v) and 0 <= v < self.vocab_size):
        raise ConfigError(
          f"model.{name} must be None or an integer in [0, {self.vocab_size}), got {v!r}"
        )
    if self.rope_scaling is not None:
      self._validate_rope_scaling(self.rope_scaling)

  def _validate_rope_scaling(self, rs: dict[str, Any]) -> None:
    kind = rs.get("rope_type", rs.get("type", "default"))
    if not isinstance(kind, str) or kind not in _ROPE_TYPES:
      raise ConfigError(
        f"model.rope_scaling type {kind!r} is not supported; supported: {_ROPE_TYPES}"
      )
    need = {
      "linear": ("factor",),
      "llama3": (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
      ),
    }.get(kind, ())
    missing = [k for k in need if k not in rs]
    if missing:
      raise ConfigError(f"model.rope_scaling of type {kind!r} lacks {missing}")
    for k in need:
      v = rs[k]
      if k == "original_max_position_embeddings":
        ok = is_int(v) and 0 < v <= 1 << 24
      else:
        ok = is_number(v) and 0 < v <= 1e6
      if not ok:
        raise ConfigError(
          f"model.rope_scaling.{k} must be a "
          f"{'positive integer' if k.startswith('orig') else 'number in (0, 1e6]'}"
          f", got {v!r}"
        )
    if kind == "llama3" and not rs["low_freq_factor"] < rs["high_freq_factor"]:
      # The blend between the two bands divides by their difference.
      raise ConfigError(
        f"model.rope_scaling.low_freq_factor ({rs['low_freq_factor']}) must be "
        f"below high_freq_factor ({rs['high_freq_factor']})"
      )

  # ------------------------------------------------------------- helpers
  @property
  def compute_dtype(self) -> jnp.dtype:
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> jnp.dtype:
    return _DTYPES[self.param_dtype]

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  @property
  def rope_type(self) -> str:
    if not self.rope_scaling:
      return "default"
    return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

  def replace(self, **changes: Any) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
    """From our own field names; unknown keys are an error (typos must not pass)."""
    if not isinstance(d, Mapping):
      raise ConfigError(f"a model config must be a dict of fields, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f"unknown model config fields {unknown}; known: {sorted(names)}")
    required = [
      f.name
      for f in dataclasses.fields(cls)
      if f.default is dataclasses.MISSING and f.name not in d
    ]
    if required:
      raise ConfigError(f"model config lacks required fields {required}")
    return cls(**dict(d))

  # --------------------------------------------------------- HuggingFace
  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> "LlamaConfig":
    """From a HuggingFace Llama `config.json` dict (transformers 4 or 5 spelling)."""
    if not isinstance(hf, Mapping):
      raise ConfigError(f"config.json must hold an object, got {type(hf).__name__}")
    mt = hf.get("model_type", "llama")
    if mt not in ("llama", "mistral") and "llama" not in str(hf.get("architectures", "")).lower():
      raise ConfigError(f"model_type {mt!r} is not a Llama-family model")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ConfigError("attention_bias / mlp_bias Llama variants are not supported")
    for key in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
    ):
      if key not in hf:
        raise ConfigError(f"config.json lacks {key!r}")
    # transformers 5 writes `rope_parameters` ({rope_theta, rope_type, ...});
    # transformers 4 writes `rope_theta` and `rope_scaling` at top level.
    for key in ("rope_parameters", "rope_scaling"):
      if hf.get(key) is not None and not isinstance(hf[key], Mapping):
        raise ConfigError(f"config.json {key} must be an object or null, got {hf[key]!r}")
    rope_params = dict(hf.get("rope_parameters") or {})
    theta = rope_params.pop("rope_theta", hf.get("rope_theta", 10_000.0))
    if not is_number(theta):
      raise ConfigError(f"config.json rope_theta must be a number, got {theta!r}")
    scaling = hf.get("rope_scaling") or (rope_params or None)
    if scaling is not None:
      scaling = dict(scaling)
      if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
      scaling.pop("rope_theta", None)
      if scaling.get("rope_type", "default") == "default":
        scaling = None

    def token(name: str) -> int | None:
      v = hf.get(name)
      if isinstance(v, list):  # Llama 3 lists several eos ids
        v = v[0] if v else None
      return v

    heads = hf["num_attention_heads"]
    fields = dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or 0,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta),
      rope_scaling=scaling,
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      bos_token_id=token("bos_token_id"),
      eos_token_id=token("eos_token_id"),
      pad_token_id=token("pad_token_id"),
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict[str, Any]:
    """A transformers-5 style `config.json` dict (also readable by transformers 4.45+)."""
    rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling:
      rope.update(self.rope_scaling)
    return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads,
      "head_dim": self.head_dim,
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
      "rope_parameters": rope,
      "max_position_embeddings": self.max_position_embeddings,
      "tie_word_embeddings": self.tie_word_embeddings,
      "bos_token_id": self.bos_token_id,
      "eos_token_id": self.eos_token_id,
      "pad_token_id": self.pad_token_id,
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "torch_dtype": self.param_dtype,
    }


def read_json_object(file: str, error: type[Exception] = ValueError) -> dict[str, Any]:
  """A JSON object from `file`; anything else raises `error` naming the file."""
  try:
    with open(file, encoding="utf-8") as f:
      obj = json.load(f)
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
    raise error(f"{file}: not valid JSON ({str(e)[:200]})") from None
  if not isinstance(obj, dict):
    raise error(f"{file}: expected a JSON object, found {type(obj).__name__}")
  return obj


def load_hf_config(path: str, **overrides: Any) -> LlamaConfig:
  """Reads `config.json` from a file or directory, with one-line errors."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file}: no config.json; expected a HuggingFace Llama directory")
  hf = read_json_object(file, ConfigError)
  try:
    return LlamaConfig.from_hf(hf, **overrides)
  except ConfigError as e:
    raise ConfigError(f"{file}: {e}") from None


def from_config_dict(model_cfg: Any) -> LlamaConfig:
  """From the `model` section of an ml_collections ConfigDict in configs/."""
  d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  d.pop("checkpoint", None)  # where to load weights from, not a shape
  d.pop("random_init", None)  # whether an empty checkpoint may mean random weights
  return LlamaConfig.from_dict(d)
