"""The one table between ir_jax parameter paths and HuggingFace / GGUF tensor names.

Import reads it left to right, export right to left. A transform is either
`copy` (same layout) or `linear` (HF stores `[out, in]`; we store the
transpose, split per head where the parameter has head axes).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple[str, ...]  # path in the model's nnx.State (pure dict)
  hf: str  # HF key; "{i}" is the layer index for stacked layer parameters
  gguf: str  # GGUF tensor name; "{i}" likewise
  transform: str  # "copy" | "linear"

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf


_L = "model.layers.{i}."
TABLE: tuple[Entry, ...] = (
  Entry(("embed_tokens",), "model.embed_tokens.weight", "token_embd.weight", "copy"),
  Entry(("norm", "weight"), "model.norm.weight", "output_norm.weight", "copy"),
  Entry(("lm_head",), "lm_head.weight", "output.weight", "linear"),
  Entry(
    ("layers", "input_layernorm", "weight"),
    _L + "input_layernorm.weight",
    "blk.{i}.attn_norm.weight",
    "copy",
  ),
  Entry(
    ("layers", "post_attention_layernorm", "weight"),
    _L + "post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight",
    "copy",
  ),
  Entry(
    ("layers", "self_attn", "q_proj"),
    _L + "self_attn.q_proj.weight",
    "blk.{i}.attn_q.weight",
    "linear",
  ),
  Entry(
    ("layers", "self_attn", "k_proj"),
    _L + "self_attn.k_proj.weight",
    "blk.{i}.attn_k.weight",
    "linear",
  ),
  Entry(
    ("layers", "self_attn", "v_proj"),
    _L + "self_attn.v_proj.weight",
    "blk.{i}.attn_v.weight",
    "linear",
  ),
  Entry(
    ("layers", "self_attn", "o_proj"),
    _L + "self_attn.o_proj.weight",
    "blk.{i}.attn_output.weight",
    "linear",
  ),
  Entry(
    ("layers", "mlp", "gate_proj"), _L + "mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", "linear"
  ),
  Entry(("layers", "mlp", "up_proj"), _L + "mlp.up_proj.weight", "blk.{i}.ffn_up.weight", "linear"),
  Entry(
    ("layers", "mlp", "down_proj"), _L + "mlp.down_proj.weight", "blk.{i}.ffn_down.weight", "linear"
  ),
)


def entries(tied: bool) -> Iterator[Entry]:
  for e in TABLE:
    if tied and e.path == ("lm_head",):
      continue
    yield e


def hf_shape(entry: Entry, ours: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape for one layer's slice of our parameter shape `ours`."""
  if entry.transform == "copy":
    return tuple(ours)
  # Our kernel is [in..., out...] with the head split on the `in` side for
  # o_proj ([H, K, D]) and on the `out` side for q/k/v ([D, N, K]).
  if entry.path[-1] == "o_proj":
    return (ours[-1], int(np.prod(ours[:-1])))
  return (int(np.prod(ours[1:])), ours[0])


def to_ours(entry: Entry, w: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
  """HF layout -> ours for one layer's slice (shape already checked)."""
  if entry.transform == "copy":
    return w.reshape(ours)
  return np.ascontiguousarray(w.T).reshape(ours)


def to_hf(entry: Entry, w: np.ndarray) -> np.ndarray:
  """Ours -> HF layout for one layer's slice."""
  if entry.transform == "copy":
    return w
  shape = hf_shape(entry, w.shape)
  return np.ascontiguousarray(w.reshape(shape[::-1]).T)
