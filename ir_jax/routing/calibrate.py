"""Causal thresholds: what a model was calibrated for.

`calibrate_thresholds` sets the per-unit thresholds causal mode (decoding)
compares scores with, and `check_calibrated` refuses causal routing at
capacities they were not calibrated for.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax.config import ConfigError
from ir_jax.distributed import host_array
from ir_jax.forecast import UNITS
from ir_jax.model import Llama
from ir_jax.progress import counter, doing
from ir_jax.routing.capacity import model_table
from ir_jax.routing.spec import RoutingSpec, layer_caps

Array = jax.Array


# ------------------------------------------------------------ calibration
def _as_batch(b: Array | dict[str, Array]) -> dict[str, Array]:
  """Token rows `[B, T]`, or a packed batch with positions and segment ids."""
  if isinstance(b, dict):
    out = {"inputs": jnp.asarray(b["inputs"], jnp.int32)}
    for k in ("positions", "segment_ids"):
      if b.get(k) is not None:
        out[k] = jnp.asarray(b[k], jnp.int32)
    return out
  return {"inputs": jnp.asarray(b, jnp.int32)}


def calibrate_thresholds(
  model: Llama,
  batches: Iterable[Array | dict[str, Array]],
  spec: RoutingSpec,
  iterations: int = 2,
) -> np.ndarray:
  """Sets causal-mode thresholds so each unit executes its capacity on `batches`.

  A batch is token rows `[B, T]` (each row one sequence from position 0) or a packed
  batch (`inputs`, `positions`, `segment_ids`, as the data pipeline yields): routing
  then sees documents as evaluation does (segment starts execute, positions restart)
  and padding (segment id 0) takes no part in the quantiles.

  Scores are first collected under top-k routing at the same capacities (so
  later layers see routed inputs), and each unit's threshold is the
  (1 - capacity) quantile of its scores. Then, `iterations` times, scores are
  collected again under causal routing with the current thresholds (the mode
  decoding uses; a unit's inputs depend on earlier units' decisions) and the
  quantiles are taken again. Returns thresholds `[L, 2]` and stores them in the model.
  """
  batches = [_as_batch(b) for b in batches]
  if not batches:
    raise ValueError("calibrate_thresholds needs at least one batch of held-out tokens")
  cfg = model.config
  spec.check_layers(cfg.num_layers)
  caps = layer_caps(spec, cfg)
  # Under a command (a heartbeat is on) each forward pass over a batch is counted.
  bar = counter("  calibration", (1 + iterations) * len(batches), unit="passes")
  passes = [0]

  def quantiles(scoring: RoutingSpec) -> np.ndarray:
    fwd = nnx.jit(
      lambda m, b: m(
        b["inputs"], b.get("positions"), b.get("segment_ids"), routing=scoring, return_aux=True
      )[1]["scores_BxT"]
    )
    chunks = []
    for i, b in enumerate(batches):
      what = f"compiling the {scoring.mode} calibration pass" if i == 0 else "calibrating"
      with doing(what):
        c = host_array(fwd(model, b))  # [L, 2, B, T]
      passes[0] += 1
      bar(passes[0])
      real = host_array(b["segment_ids"]) > 0 if "segment_ids" in b else np.ones(c.shape[2:], bool)
      chunks.append(c[:, :, real])
    scores = np.concatenate(chunks, axis=-1)
    thr = np.zeros((cfg.num_layers, len(UNITS)), np.float32)
    for l in range(cfg.num_layers):
      for u in range(len(UNITS)):
        c = caps[l, u]
        if c >= 1.0:
          thr[l, u] = -np.inf
        elif c <= 0.0:
          thr[l, u] = np.inf
        else:
          thr[l, u] = _threshold_between(scores[l, u], c)
    return thr

  thr = quantiles(spec.inference("topk"))
  causal = spec.inference("causal")
  for _ in range(iterations):
    model.routing.threshold[...] = jnp.asarray(thr)
    thr = quantiles(causal)
  model.routing.threshold[...] = jnp.asarray(thr)
  model.routing.calibrated_for[...] = jnp.asarray(caps)
  return thr


def _threshold_between(scores: np.ndarray, capacity: float) -> np.float32:
  """A float32 threshold that `capacity` of `scores` exceed and none equals.

  It lies halfway between the score at the (1 - capacity) quantile (taken as the
  nearest lower score) and the next larger distinct score, so ties decide nothing on
  the calibration data: `score > threshold` here and an exported `[score, threshold]`
  argmax (which executes on a tie) agree on every calibration token.
  """
  s = np.unique(scores.astype(np.float32).ravel())  # sorted, distinct
  q = np.quantile(scores.astype(np.float64), 1.0 - capacity)
  i = max(int(np.searchsorted(s, q, side="right")) - 1, 0)  # largest score <= q
  lo = s[i]
  if i + 1 >= len(s):
    return np.nextafter(lo, np.float32(np.inf))
  mid = np.float32((np.float64(lo) + np.float64(s[i + 1])) / 2)
  return mid if lo < mid < s[i + 1] else lo


def _sparsities(caps: np.ndarray) -> str:
  """`mean sparsity 0.400 (attention 0.000, MLP 0.800)` of capacities `[L, 2]`."""
  s = 1.0 - np.asarray(caps, np.float64)
  return f"mean sparsity {s.mean():.3f} (attention {s[:, 0].mean():.3f}, MLP {s[:, 1].mean():.3f})"


def check_calibrated(model: Llama, spec: RoutingSpec) -> None:
  """Refuses causal routing at capacities the model's thresholds were not calibrated for.

  Units at capacity 1 or 0 ignore thresholds and are not checked; top-k mode and
  the dense policy need no thresholds. Does nothing under a trace (the values are
  not known): call it before jitting, as `generate` and the evaluators do.

  The refusal says what the thresholds fit and what the spec asks, per unit type, so two
  specs with the same mean read apart; when the thresholds fit the model's trained
  capacity table and the spec names no table, it names the way to route with that table
  (`ir_jax.routing.trained_spec`), which every entry point (ir_jax.eval, ir_jax.generate,
  the lm-eval adapter, training's evaluation) takes.
  """
  if spec.mode != "causal" or spec.policy == "dense":
    return
  stored = model.routing.calibrated_for[...]
  if isinstance(stored, jax.core.Tracer):
    return
  cfg = model.config
  want = layer_caps(spec, cfg)
  stored = np.asarray(stored, np.float32)
  used = (want > 0) & (want < 1)
  if np.allclose(stored[used], want[used], rtol=0, atol=1e-6):
    return
  table = model_table(model)
  asked = (
    f"a uniform sparsity {1 - float(want.mean()):.3f} on every unit"
    if spec.capacities is None
    else f"a capacity table of {_sparsities(want)}"
  )
  if (stored < 0).all():
    raise ConfigError(
      f"causal routing at {asked}: the model's thresholds were never calibrated; calibrate "
      "them for this spec first (ir_jax.routing.calibrate_thresholds(model, held-out "
      "batches, spec); python -m ir_jax.eval --mode causal calibrates on its own), or route "
      "in top-k mode"
    )
  diff = int(np.sum(~np.isclose(stored, want, rtol=0, atol=1e-6) & used))
  fits_table = table is not None and np.allclose(stored, np.asarray(table), rtol=0, atol=1e-6)
  fitted = (
    f"the model's trained per-unit capacity table, {_sparsities(stored)}"
    if fits_table
    else f"other capacities, {_sparsities(stored)}"
  )
  if fits_table and spec.capacities is None:
    same_mean = abs(float(stored.mean()) - float(want.mean())) <= 1e-6
    how = (
      "this spec's mean sparsity is the table's, so route with the table: "
      "ir_jax.routing.trained_spec(model, spec) (what ir_jax.eval, ir_jax.generate and the "
      "lm-eval adapter do)"
      if same_mean
      else "ir_jax.routing.trained_spec(model, spec) routes with the table moved to this "
      "sparsity, whose thresholds must then be calibrated (ir_jax.routing.calibrate_thresholds"
      "(model, held-out batches, that spec)); or route in top-k mode"
    )
  else:
    how = (
      "calibrate them for this spec first (ir_jax.routing.calibrate_thresholds(model, "
      "held-out batches, spec); python -m ir_jax.eval --mode causal calibrates on its own), "
      "or route in top-k mode"
    )
  raise ConfigError(
    f"causal routing at {asked}: the model's thresholds were calibrated for {fitted} "
    f"({diff} of {int(used.sum())} routed units differ); {how}"
  )
