"""The routing plan: what one routed forward (or one decode step) runs, computed once.

`prefill_plan(cfg, spec, seq_len)` (training, prefill, scoring) and
`decode_plan(cfg, spec, rows)` (one token per row) fix, for every layer and unit,
its static form: how many tokens (rows, in a decode step) it executes, and whether it
is forecast-only (capacity 0: no router; segment starts use its sink slots). They
also carry each unit's capacity and whether every unit runs for every token.

The routed layer reads one plan whatever the caller: a unit type's distinct forms
are its `levels`, and each layer's `level_index` says which one it takes. Scanned
layers switch among a unit's levels (`lax.switch`, one branch taken; a uniform spec
has one level, so no switch); unrolled layers take their level statically. The cost
model (`routing.cost`) and the AOT view (`ir_jax.aot`) read the same plan.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from ir_jax.config import LlamaConfig
from ir_jax.forecast import UNITS
from ir_jax.routing.spec import RoutingSpec, layer_caps, layer_ks, row_k


class Form(NamedTuple):
  """One unit's static form in one layer: `k` tokens per row executed (rows per decode
  step under row capacity); `forecast_only`: capacity 0, no router runs."""

  k: int
  forecast_only: bool


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """Per layer and unit: form and capacity; and whether every unit runs every token."""

  forms: tuple[tuple[Form, ...], ...]  # [L][2]
  caps: np.ndarray  # [L, 2] float32: the spec's capacities
  runs_all: bool  # every unit runs for every token (causal, compute="all", Gumbel)
  seq_len: int  # tokens per row (1 in a decode step)
  policy: str

  @property
  def levels(self) -> tuple[tuple[Form, ...], ...]:
    """The distinct forms of each unit type over the layers, sorted."""
    return tuple(tuple(sorted({row[u] for row in self.forms})) for u in range(len(UNITS)))

  @property
  def level_index(self) -> np.ndarray:
    """`[L, 2]`: each layer's position in its unit type's `levels`."""
    levels = self.levels
    return np.array(
      [[levels[u].index(f) for u, f in enumerate(row)] for row in self.forms], np.int32
    )

  @property
  def ks(self) -> np.ndarray:
    """`[L, 2]` static counts: tokens per row each unit executes in top-k mode."""
    return np.array([[f.k for f in row] for row in self.forms], np.int32)

  def tokens(self) -> np.ndarray:
    """`[L, 2]`: tokens per row that run each unit, as the forward computes them (every
    token when every unit runs, and under the oracle, which ranks tokens by running them)."""
    if self.runs_all or self.policy == "oracle":
      return np.full((len(self.forms), len(UNITS)), self.seq_len, np.int32)
    return self.ks


def runs_all(spec: RoutingSpec) -> bool:
  """Every unit runs for every token: causal thresholds, compute="all" and Gumbel gates
  mix executed and forecast outputs by a gate."""
  return spec.mode == "causal" or spec.compute == "all" or spec.gate == "gumbel"


def prefill_plan(cfg: LlamaConfig, spec: RoutingSpec, seq_len: int) -> Plan:
  """The plan of a forward over rows of `seq_len` tokens (training, prefill, scoring)."""
  ks = layer_ks(spec, cfg, seq_len)
  # A capacity-0 unit and a small capacity may share k but not code (the former runs no
  # router): the form holds both.
  forms = tuple(
    tuple(Form(int(ks[l, u]), spec.forecast_only(l, u)) for u in range(len(UNITS)))
    for l in range(cfg.num_layers)
  )
  return Plan(forms, layer_caps(spec, cfg), runs_all(spec), seq_len, spec.policy)


def decode_plan(cfg: LlamaConfig, spec: RoutingSpec, rows: int) -> Plan:
  """The plan of one decode step of `rows` rows: in top-k mode (static row capacity) each
  unit executes its top `row_k` rows; in causal mode thresholds decide (k unused)."""
  spec.check_layers(cfg.num_layers)
  forms = tuple(
    tuple(
      Form(row_k(spec, rows, l, u) if spec.mode == "topk" else 1, False) for u in range(len(UNITS))
    )
    for l in range(cfg.num_layers)
  )
  return Plan(forms, layer_caps(spec, cfg), runs_all(spec), 1, spec.policy)
