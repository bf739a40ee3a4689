"""Weight sources: a HuggingFace Llama directory and a GGUF Llama file.

Both give the model config and tensors by HF key in HF layout, one at a time,
so import never holds two copies of the model.
"""

from __future__ import annotations

import json
import os
from typing import Protocol

import numpy as np

from ir_jax.config import ConfigError, LlamaConfig, load_hf_config
from ir_jax.convert import mapping, routing_io
from ir_jax.convert.errors import WeightImportError  # noqa: F401  (also importable from here)
from ir_jax.convert.safetensors_io import SafetensorsFile
from ir_jax.gguf_io import GGUFError, GGUFFile


class Source(Protocol):
  path: str
  config: LlamaConfig

  def has(self, key: str) -> bool: ...
  def shape(self, key: str) -> tuple[int, ...]: ...
  def get(self, key: str) -> np.ndarray: ...
  def where(self, key: str) -> str: ...


class HFSource:
  """A transformers `save_pretrained` directory with safetensors weights."""

  def __init__(self, path: str, **config_overrides):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path}: not a directory; expected a HuggingFace Llama directory")
    self.path = path
    # An ir_jax export carries its forecasters and routers beside the weights;
    # routing.json also holds the model fields config.json cannot express.
    self.routing = routing_io.read_manifest(path)
    if self.routing is not None:
      config_overrides = {**routing_io.config_overrides(self.routing), **config_overrides}
    try:
      self.config = load_hf_config(path, **config_overrides)
    except ConfigError as e:
      # A bad value that came from routing.json must be blamed on routing.json.
      msg = str(e).split(": ", 1)[-1] if str(e).startswith(path) else str(e)
      bad = [f for f in (self.routing or {}).get("model", {}) if f"model.{f} " in msg]
      if not bad:
        raise
      raise WeightImportError(f"{os.path.join(path, routing_io.MANIFEST)}: {msg}") from None
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    if os.path.exists(index):
      weight_map = _read_index(index)
      for key, fname in weight_map.items():
        fpath = os.path.join(path, os.path.basename(str(fname)))
        if fpath not in self._files:
          self._files[fpath] = SafetensorsFile(fpath)
        self._where[key] = fpath
    elif os.path.exists(single):
      st = SafetensorsFile(single)
      self._files[single] = st
      self._where = {k: single for k in st.keys()}
    else:
      bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
      hint = (
        (
          f" (found {bins[0]}: pickled weights are never loaded; re-save with "
          "safe_serialization=True)"
        )
        if bins
        else ""
      )
      raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")

  def has(self, key: str) -> bool:
    return key in self._where and key in self._files[self._where[key]]

  def shape(self, key: str) -> tuple[int, ...]:
    return self._files[self._where[key]].shape(key)

  def get(self, key: str) -> np.ndarray:
    return self._files[self._where[key]].get(key)

  def where(self, key: str) -> str:
    return self._where.get(key, os.path.join(self.path, "model.safetensors"))


# An index names each tensor once; 64 MiB is ~500k tensors, 50x a 1,024-layer Llama.
_MAX_INDEX = 64 << 20


def _read_index(index: str) -> dict[str, str]:
  """The `weight_map` of model.safetensors.index.json (tensor name -> shard file name)."""
  size = os.path.getsize(index)
  if size > _MAX_INDEX:
    raise WeightImportError(f"{index}: {size} bytes; a safetensors index is at most {_MAX_INDEX}")
  try:
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
  except (ValueError, RecursionError, KeyError, TypeError) as e:  # ValueError: bad JSON / UTF-8
    raise WeightImportError(
      f"{index}: not a valid safetensors index; expected an object with "
      f"a 'weight_map' of tensor name -> file ({str(e)[:200]})"
    ) from None
  if not isinstance(weight_map, dict) or not all(
    isinstance(v, str) and v for v in weight_map.values()
  ):
    raise WeightImportError(f"{index}: 'weight_map' must map tensor names to file names")
  return weight_map


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head interleaving of q/k rows (rotary layout)."""
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
  """A llama.cpp GGUF file of the `llama` architecture; tensors dequantized to float32."""

  def __init__(self, path: str, **config_overrides):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such GGUF file")
    self.path = path
    try:
      self.reader = GGUFFile(path)
    except GGUFError as e:
      raise WeightImportError(f"{path}: not a readable GGUF file ({e})") from None
    arch = self.field("general.architecture")
    if arch != "llama":
      raise WeightImportError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    self.tensors = {t.name: t for t in self.reader.tensors}
    self.config = self._config(**config_overrides)

  def field(self, name: str, default=None):
    f = self.reader.fields.get(name)
    if f is None:
      return default
    v = f.contents()
    return v

  def _config(self, **overrides) -> LlamaConfig:
    def typed(key: str, kind: type, default=None, required: bool = False):
      v = self.field(key)
      if v is None:
        if required:
          raise WeightImportError(f"{self.path}: GGUF metadata lacks {key!r}")
        return default
      ok = isinstance(v, kind) and not isinstance(v, bool)
      if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
      if not ok:
        raise WeightImportError(
          f"{self.path}: GGUF metadata {key!r} must be "
          f"{'an integer' if kind is int else 'a number'}, got "
          f"{str(v)[:100]!r}"
        )
      return v

    tokens = self.reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens.value) if tokens is not None and isinstance(tokens.value, list) else None
    vocab = typed("llama.vocab_size", int) or n_tokens
    if vocab is None:
      raise WeightImportError(f"{self.path}: GGUF metadata gives no vocabulary size")
    heads = typed("llama.attention.head_count", int, required=True)
    d = typed("llama.embedding_length", int, required=True)
    head_dim = typed("llama.rope.dimension_count", int) or (d // heads if heads > 0 else 0)
    scaling = None
    if self.field("llama.rope.scaling.type") not in (None, "none"):
      raise WeightImportError(
        f"{self.path}: GGUF rope scaling "
        f"{str(self.field('llama.rope.scaling.type'))[:100]!r} is not supported"
      )
    fields = dict(
      vocab_size=vocab,
      hidden_size=d,
      intermediate_size=typed("llama.feed_forward_length", int, required=True),
      num_layers=typed("llama.block_count", int, required=True),
      num_heads=heads,
      num_kv_heads=typed("llama.attention.head_count_kv", int) or heads,
      head_dim=head_dim,
      rms_norm_eps=float(typed("llama.attention.layer_norm_rms_epsilon", float, required=True)),
      rope_theta=float(typed("llama.rope.freq_base", float) or 10_000.0),
      rope_scaling=scaling,
      max_position_embeddings=typed("llama.context_length", int) or 4096,
      tie_word_embeddings="output.weight" not in self.tensors,
      bos_token_id=typed("tokenizer.ggml.bos_token_id", int),
      eos_token_id=typed("tokenizer.ggml.eos_token_id", int),
      pad_token_id=typed("tokenizer.ggml.padding_token_id", int),
    )
    fields.update(overrides)
    try:
      return LlamaConfig(**fields)
    except ConfigError as e:
      raise WeightImportError(f"{self.path}: {e}") from None

  def _name(self, key: str) -> str:
    for e in mapping.TABLE:
      if e.per_layer:
        prefix, suffix = e.hf.split("{i}")
        if key.startswith(prefix) and key.endswith(suffix):
          i = key[len(prefix) : len(key) - len(suffix)]
          if i.isdigit():
            return e.gguf.replace("{i}", i)
      elif e.hf == key:
        return e.gguf
    raise KeyError(key)

  def has(self, key: str) -> bool:
    try:
      return self._name(key) in self.tensors
    except KeyError:
      return False

  def shape(self, key: str) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-first; numpy (and HF) order is the reverse.
    return tuple(int(s) for s in reversed(self.tensors[self._name(key)].shape))

  def get(self, key: str) -> np.ndarray:
    from gguf import quants

    t = self.tensors[self._name(key)]
    try:
      w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    except (NotImplementedError, ValueError) as e:
      raise WeightImportError(
        f"{self.path}: tensor {t.name} of type {t.tensor_type.name} cannot be dequantized ({e})"
      ) from None
    w = w.reshape(self.shape(key))
    if key.endswith("q_proj.weight"):
      w = _unpermute_rows(w, self.config.num_heads)
    elif key.endswith("k_proj.weight"):
      w = _unpermute_rows(w, self.config.num_kv_heads)
    return w

  def where(self, key: str) -> str:
    return self.path
