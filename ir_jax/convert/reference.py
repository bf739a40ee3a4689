"""The tensor layout of the public PyTorch informed-routing code (EIT-NLP LLM-Pruning, `LFF/`).

That code wraps every `LlamaDecoderLayer` in a module holding the original
layer as `block` plus, per unit, a forecaster (`LightweightNetwork`:
`linear1` d -> r, SiLU, `linear2` r -> d) and a router (`TokenRouter`:
`hidden_layer` d -> h, ReLU, `weight_predictor` h -> 2 logits). Its state
dict therefore names them (torch `nn.Linear` weights are `[out, in]`):

  model.layers.{i}.lw_attn.linear1.weight                  [r, d]
  model.layers.{i}.lw_attn.linear1.bias                    [r]
  model.layers.{i}.lw_attn.linear2.weight                  [d, r]
  model.layers.{i}.lw_attn.linear2.bias                    [d]
  model.layers.{i}.lw_mlp.*                                 (same)
  model.layers.{i}.router_attention.hidden_layer.weight    [h, d]
  model.layers.{i}.router_attention.hidden_layer.bias      [h]
  model.layers.{i}.router_attention.weight_predictor.weight [2, h]
  model.layers.{i}.router_attention.weight_predictor.bias   [2]
  model.layers.{i}.router_mlp.*                             (same)

The reference draws hard Gumbel-softmax gates over the two logits; index 0
executes the unit, index 1 approximates it with the forecaster. Our router
gives one score s (higher = execute) and causal mode executes iff s > t, the
unit's calibrated threshold. It is exported as logits [s, t]: the threshold
sits in `weight_predictor.bias[1]` (row 1 of the weight is zero), so the
reference's deterministic gate (argmax) executes exactly where our causal mode
does, and softmax index 0 is sigmoid(s - t). On an exact tie s == t argmax
picks index 0 (executes) where we do not; calibrated thresholds lie halfway
between two neighbouring calibration scores, so no calibration token ties.
A threshold of -inf (always execute) or +inf (never) is written as -/+1e30 so
softmax stays finite. Importing one of our exports reads s from index 0 and t
from routing.json (exact); importing other reference weights takes
s = logit0 - logit1 and threshold 0 (their rule: execute when logit0 wins).
A linear router (router_hidden 0) has no hidden layer in our model; it is
exported as the exact two-unit ReLU network relu(w.n) - relu(-w.n) = w.n.

Their `LightweightNetwork` fixes the forecaster rank at 100 and their router
width at d // 4 - 200 (negative below d = 800), so a model with other widths
needs those two edited in their code; their scripts' `--skipgpt` flag must be
off.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ir_jax.convert.errors import WeightImportError

PREFIX = "model.layers.{i}."
FORECASTERS = {"attn_lff": "lw_attn", "mlp_lff": "lw_mlp"}
ROUTERS = {"attn_router": "router_attention", "mlp_router": "router_mlp"}
EXECUTE_INDEX = 0  # the reference's gumbel index that runs the unit
INF_BIAS = 1e30  # stands for an infinite threshold in weight_predictor.bias[1]


def threshold_bias(threshold: np.ndarray, dtype) -> np.ndarray:
  """A threshold as the reference's second logit bias (finite: +-inf becomes +-INF_BIAS)."""
  return np.clip(np.asarray(threshold, np.float64), -INF_BIAS, INF_BIAS).astype(dtype)


def layout(d: int, lff_rank: int, router_hidden: int) -> dict[str, tuple[int, ...]]:
  """Reference key (layer-relative, after PREFIX) -> shape, for one layer."""
  h = router_hidden or 2  # a linear router becomes a 2-unit ReLU layer
  out: dict[str, tuple[int, ...]] = {}
  for ref in FORECASTERS.values():
    out.update(
      {
        f"{ref}.linear1.weight": (lff_rank, d),
        f"{ref}.linear1.bias": (lff_rank,),
        f"{ref}.linear2.weight": (d, lff_rank),
        f"{ref}.linear2.bias": (d,),
      }
    )
  for ref in ROUTERS.values():
    out.update(
      {
        f"{ref}.hidden_layer.weight": (h, d),
        f"{ref}.hidden_layer.bias": (h,),
        f"{ref}.weight_predictor.weight": (2, h),
        f"{ref}.weight_predictor.bias": (2,),
      }
    )
  return out


def to_reference(
  layer: Callable[[str, str], np.ndarray],
  router_hidden: int,
  key: str,
  thresholds: np.ndarray | None = None,
) -> np.ndarray:
  """One reference tensor of one layer; `layer(module, param)` gives our slice.

  `thresholds` `[2]` (attn, mlp): the layer's causal thresholds, folded into
  the routers' second logit (None: 0, execute when the score is positive).
  """
  module, _, rest = key.partition(".")
  if module in FORECASTERS.values():
    ours = {v: k for k, v in FORECASTERS.items()}[module]
    linear, param = rest.split(".")
    n = linear[-1]  # linear1 / linear2
    w = layer(ours, ("w" if param == "weight" else "b") + n)
    return np.ascontiguousarray(w.T) if param == "weight" else w
  ours = {v: k for k, v in ROUTERS.items()}[module]
  w2, b2 = layer(ours, "w2"), layer(ours, "b2")
  zero = np.zeros((), w2.dtype)
  if rest == "weight_predictor.bias":
    unit = list(ROUTERS).index(ours)
    t = zero if thresholds is None else threshold_bias(thresholds[unit], w2.dtype)
    return np.stack([b2[0], t])
  if router_hidden:
    if rest == "hidden_layer.weight":
      return np.ascontiguousarray(layer(ours, "w1").T)
    if rest == "hidden_layer.bias":
      return layer(ours, "b1")
    return np.stack([w2, np.zeros_like(w2)])  # weight_predictor.weight
  if rest == "hidden_layer.weight":
    return np.stack([w2, -w2])
  if rest == "hidden_layer.bias":
    return np.zeros((2,), w2.dtype)
  one = np.ones((), w2.dtype)
  return np.array([[one, -one], [zero, zero]], w2.dtype)


def from_reference(
  get: Callable[[str], np.ndarray], router_hidden: int, where: str, thresholds_in_bias: bool = False
) -> dict[str, dict[str, np.ndarray]]:
  """One layer's forecasters and routers in our layout from its reference tensors.

  `thresholds_in_bias`: our export, whose `weight_predictor.bias[1]` holds the
  threshold; the score is then logit 0 alone (the threshold comes from routing.json).
  """
  out: dict[str, dict[str, np.ndarray]] = {}
  for ours, ref in FORECASTERS.items():
    out[ours] = {
      "w1": np.ascontiguousarray(get(f"{ref}.linear1.weight").T),
      "b1": get(f"{ref}.linear1.bias"),
      "w2": np.ascontiguousarray(get(f"{ref}.linear2.weight").T),
      "b2": get(f"{ref}.linear2.bias"),
    }
  for ours, ref in ROUTERS.items():
    hw, hb = get(f"{ref}.hidden_layer.weight"), get(f"{ref}.hidden_layer.bias")
    pw, pb = get(f"{ref}.weight_predictor.weight"), get(f"{ref}.weight_predictor.bias")
    b2 = (pb[0] if thresholds_in_bias else pb[0] - pb[1]).reshape(1)
    if router_hidden:
      out[ours] = {"w1": np.ascontiguousarray(hw.T), "b1": hb, "w2": pw[0] - pw[1], "b2": b2}
      continue
    linear = (
      np.array_equal(hw[1], -hw[0])
      and not np.any(hb)
      and np.array_equal(pw.astype(np.float32), [[1, -1], [0, 0]])
    )
    if not linear:
      raise WeightImportError(
        f"{where}: {ref} is a general ReLU router but the model has router_hidden 0 "
        "(a linear router); set router_hidden to its hidden width to import it"
      )
    out[ours] = {"w2": hw[0], "b2": b2}
  return out
