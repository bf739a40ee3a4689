"""`RoutingSpec`, what it accepts, and the per-unit capacities and token counts it implies.

Everything here is a function of the spec (and the model's shape) alone: no
arrays, no model weights. The other routing modules build on this one.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, ClassVar

import numpy as np

from ir_jax.config import ConfigError, LlamaConfig, is_int
from ir_jax.forecast import UNITS

POLICIES = ("informed", "greedy", "random", "oracle", "static", "dense")
MODES = ("topk", "causal")
GATES = ("hard", "ste", "gumbel")
COMPUTES = ("gathered", "all")


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
  """How to route: hashable, so it is a static argument of jitted functions.

  policy:     one of POLICIES. "static" has no router: every unit executes every token
              (capacity 1) or is forecast for every token (capacity 0; segment starts
              still execute): unit pruning with forecasts, the baseline routing must beat.
  sparsity:   fraction of (token, unit) pairs approximated; capacity = 1 - sparsity.
  flops:      executed-FLOPs budget as a fraction of dense (forecasters and routers
              included); 0 = none (the sparsity is the target). A model's trained table
              is moved to this budget by `trained_spec`, which needs the sequence length;
              a spec with a budget and no table cannot route until then.
  mode:       "topk" (training, prefill, scoring) or "causal" (thresholds; decoding).
  gate:       "hard" (inference), "ste" (straight-through top-k: hard mask forward,
              sigmoid(score) gradient backward) or "gumbel" (binary Gumbel-softmax
              with `temperature`, straight-through; needs compute="all").
  compute:    "gathered" (only executed tokens run the unit) or "all" (every unit
              runs and is mixed by the gate: exact informed gradient for every token).
  capacities: optional per-layer ((attn, mlp), ...) capacity table; overrides sparsity.
  k_multiple: round k up to a multiple of this (never above T); 1 keeps k exact.
  seed:       for the random policy and Gumbel noise when no rng is passed.
  protect_sinks: the first token of every segment always executes (inside the
              capacity); False only to measure what that protection is worth.
  """

  policy: str = "informed"
  sparsity: float = 0.0
  flops: float = 0.0
  mode: str = "topk"
  gate: str = "hard"
  compute: str = "gathered"
  temperature: float = 1.0
  capacities: tuple[tuple[float, float], ...] | None = None
  k_multiple: int = 1
  seed: int = 0
  protect_sinks: bool = True

  # `forward(model, tokens_BxT, positions_BxT=None, segment_ids_BxT=None, **kwargs)`:
  # `routed_forward` with this spec, what `model(tokens, routing=spec)` calls. It is
  # set by `ir_jax.routing.forward`, which builds on this module: defining it here
  # would make this module import that one back (the package imports both, so every
  # RoutingSpec has it).
  forward: ClassVar[Callable[..., Any]]

  def __post_init__(self) -> None:
    def one_of(name: str, options: tuple[str, ...]) -> None:
      if getattr(self, name) not in options:
        raise ConfigError(f"routing.{name} must be one of {options}, got {getattr(self, name)!r}")

    one_of("policy", POLICIES)
    one_of("mode", MODES)
    one_of("gate", GATES)
    one_of("compute", COMPUTES)
    if not is_fraction(self.sparsity):
      raise ConfigError(f"routing.sparsity must be a number in [0, 1], got {self.sparsity!r}")
    if not (is_fraction(self.flops) and (self.flops == 0 or self.flops > 0.05)):
      raise ConfigError(
        f"routing.flops must be 0 (no FLOPs budget) or a fraction of dense FLOPs in "
        f"(0.05, 1], got {self.flops!r}"
      )
    if self.capacities is not None:
      rows = self.capacities
      if (
        not isinstance(rows, (list, tuple))
        or not rows
        or any(
          not isinstance(r, (list, tuple))
          or len(r) != len(UNITS)
          or not all(is_fraction(c) for c in r)
          for r in rows
        )
      ):
        raise ConfigError(
          "routing.capacities must be a non-empty per-layer list of "
          f"(attn, mlp) capacities in [0, 1], got {self.capacities!r}"
        )
      object.__setattr__(self, "capacities", tuple(tuple(float(c) for c in r) for r in rows))
    if not is_temperature(self.temperature):
      raise ConfigError(
        f"routing.temperature must be a number in [{_MIN_TEMPERATURE:.3g}, "
        f"{_MAX_TEMPERATURE:.3g}] (float32, > 0), got {self.temperature!r}"
      )
    if not (is_int(self.k_multiple) and self.k_multiple >= 1):
      raise ConfigError(f"routing.k_multiple must be an integer >= 1, got {self.k_multiple!r}")
    if not (is_int(self.seed) and 0 <= self.seed < 2**32):
      raise ConfigError(f"routing.seed must be an integer in [0, 2**32), got {self.seed!r}")
    if self.gate == "gumbel" and self.compute != "all":
      raise ConfigError(
        "routing.gate='gumbel' samples a variable number of tokens; it needs routing.compute='all'"
      )
    if not isinstance(self.protect_sinks, bool):
      raise ConfigError(f"routing.protect_sinks must be True or False, got {self.protect_sinks!r}")
    if self.mode == "causal" and self.gate != "hard":
      raise ConfigError("routing.mode='causal' is for inference; use gate='hard'")
    # A static run asks for a FLOPs budget before its 0/1 table exists: the table
    # that `trained_spec` resolves the budget to is checked here when it is given.
    if self.policy == "static" and not (self.capacities is None and self.flops):
      caps = [1.0 - self.sparsity] if self.capacities is None else sum(self.capacities, ())
      if any(c not in (0.0, 1.0) for c in caps):
        raise ConfigError(
          "routing.policy='static' has no router: every unit must execute every token "
          "(capacity 1) or be forecast (capacity 0); give a 0/1 capacity table (a static "
          "run's trained table) or sparsity 0 or 1"
        )

  def capacity(self, layer: int, unit: int) -> float:
    if self.policy == "dense":
      return 1.0
    if self.capacities is not None:
      return self.capacities[layer][unit]
    return 1.0 - self.sparsity

  def forecast_only(self, layer: int, unit: int) -> bool:
    """The unit is forecast for every token but segment starts: no router runs."""
    return self.policy != "dense" and self.capacity(layer, unit) <= 0.0

  def k(self, seq_len: int, layer: int, unit: int) -> int:
    """Static number of executed tokens per row in top-k mode. A unit at capacity 0 keeps
    `sink_slots` for segment starts when sinks are protected."""
    if self.forecast_only(layer, unit):
      return sink_slots(seq_len) if self.protect_sinks else 0
    k = int(round(self.capacity(layer, unit) * seq_len))
    k = -(-k // self.k_multiple) * self.k_multiple
    return min(k, seq_len)

  def check_layers(self, num_layers: int) -> None:
    if self.capacities is not None and len(self.capacities) != num_layers:
      raise ConfigError(
        f"routing.capacities has {len(self.capacities)} rows; the model has {num_layers} layers"
      )

  def inference(self, mode: str = "topk") -> RoutingSpec:
    """This spec as inference routes: hard gates, only selected tokens computed.

    Top-k mode for training-time evaluation, prefill and the LoRA stage; causal
    mode for decoding (calibrated thresholds). Policy, capacities and seed stay.
    """
    return dataclasses.replace(self, mode=mode, gate="hard", compute="gathered")


def sink_slots(seq_len: int) -> int:
  """Rows a forecast-only unit (capacity 0) still executes per row in top-k mode: room for
  the row's segment starts, which always execute (one slot per 64 tokens, at least one).
  A row with more segment starts than slots forecasts the rest; the first slots go to
  the earliest starts."""
  return min(seq_len, max(1, -(-seq_len // 64)))


def is_fraction(v: Any) -> bool:
  """A number in [0, 1]: a sparsity or a capacity."""
  # numbers.Real: numpy scalars from a sweep are fine; bools and strings are not.
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v <= 1


# Gumbel logits are divided by the temperature in float32: it must stay a
# positive, finite float32 (1e-50 would round to 0 and divide by zero).
_MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)
_MAX_TEMPERATURE = float(np.finfo(np.float32).max)


def is_temperature(v: Any) -> bool:
  """A Gumbel temperature float32 holds as a positive finite number."""
  return (
    isinstance(v, (int, float))
    and not isinstance(v, bool)
    and _MIN_TEMPERATURE <= v <= _MAX_TEMPERATURE
  )


# ------------------------------------------------- capacities and counts
def layer_caps(spec: RoutingSpec, cfg: LlamaConfig) -> np.ndarray:
  """The spec's capacity of every unit, `[L, 2]` (fractions of tokens executed)."""
  return np.array(
    [[spec.capacity(l, u) for u in range(len(UNITS))] for l in range(cfg.num_layers)], np.float32
  )


def layer_ks(spec: RoutingSpec, cfg: LlamaConfig, t: int) -> np.ndarray:
  """Static top-k counts of every unit for rows of `t` tokens, `[L, 2]` (which units run
  how much: what the routed forward, `flops` and the benchmarks all use)."""
  spec.check_layers(cfg.num_layers)
  return np.array(
    [[spec.k(t, l, u) for u in range(len(UNITS))] for l in range(cfg.num_layers)], np.int32
  )


def row_k(spec: RoutingSpec, rows: int, layer: int, unit: int) -> int:
  """Rows a unit executes in a decode step of `rows` rows under top-k routing:
  ceil(capacity x rows), never below the capacity."""
  return min(rows, int(np.ceil(spec.capacity(layer, unit) * rows - 1e-9)))
