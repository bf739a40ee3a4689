"""What a stage does before its first step: closed-form fits and the capacity table.

forecaster (init='fit'): reduced-rank ridge forecasters from one statistics pass.
router (init='fit'):     routers regress log forecast error (the oracle's target);
                         then (allocation='probe') the per-unit capacity table is
                         allocated from measured per-unit damage and stored in the model,
                         and router biases are centred on each unit's capacity.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import jax
import numpy as np

from ir_jax import fit
from ir_jax.files import write_json
from ir_jax.model import Llama
from ir_jax.progress import Progress
from ir_jax.routing import CapacityTable, allocate_flops, error_shape, mean_capacity, unit_flops
from ir_jax.routing.budget import curves_for_flops, table_flops
from ir_jax.train.config import Settings, StageConfig


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _batches(it: Iterator[dict[str, Any]], n: int) -> list[dict[str, Any]]:
  return list(itertools.islice(it, n))


def _target_sparsity(s: Settings) -> float:
  return 1.0 - mean_capacity(s.routing)


def fit_forecasters(
  s: Settings, stage_cfg: StageConfig, model: Llama, it: Iterator[dict[str, Any]]
) -> dict[str, float]:
  """The forecaster stage's closed-form start: reduced-rank ridge fits from second moments
  over batches drawn from its training stream; returns metrics to log."""
  _log(
    f"[forecaster] closed-form fit: statistics over {stage_cfg.fit_batches} batches "
    f"(ordinary tokens; segment starts excluded), rank {model.config.lff_rank}, "
    f"ridge {stage_cfg.ridge:g}"
  )
  m = fit.forecaster_moments(
    model,
    _batches(it, stage_cfg.fit_batches),
    Progress("[forecaster] statistics", stage_cfg.fit_batches, printer=_log),
    outlier=stage_cfg.outlier,
  )
  fit.set_forecasters(model, m, stage_cfg.ridge)
  dropped = int(m["dropped"].sum())
  if dropped:
    _log(
      f"[forecaster] left {dropped} (token, unit) outliers out of the fit (output energy "
      f"> {stage_cfg.outlier:g} x the batch mean)"
    )
  return {"fit_tokens": float(m["count"][0, 0]), "fit_outliers": float(dropped)}


def fit_routers(
  s: Settings, stage_cfg: StageConfig, model: Llama, it: Iterator[dict[str, Any]]
) -> dict[str, float]:
  """The router stage's closed-form start: routers regress their oracle target, then the
  capacity table is allocated; returns metrics to log."""
  if s.routing.flops:
    return _fit_flops_table(s, stage_cfg, model, it)
  greedy = s.routing.policy == "greedy"
  info = _warm_start_routers(stage_cfg, model, it, greedy)
  sparsity = _target_sparsity(s)
  alloc = stage_cfg.allocation if (s.routing.capacities is None and 0 < sparsity < 1) else "uniform"
  batches = _batches(it, stage_cfg.allocation_batches)
  shape = (model.config.num_layers, 2)
  if alloc == "error":
    scores, rel_err = fit.error_curves(model, batches, greedy)
    cost = (
      unit_flops(model.config, s.stage_data("router").seq_len)
      if stage_cfg.budget == "flops"
      else None
    )
    table = fit.allocate_curves(
      scores, rel_err, sparsity, max_sparsity=stage_cfg.max_sparsity, unit_cost=cost
    )
  elif alloc == "probe":
    _log(
      f"[router] capacity table: probing {shape[0] * shape[1]} units at sparsity "
      f"{stage_cfg.probe_level:g} on {stage_cfg.allocation_batches} batch(es)"
    )
    damage, scores = fit.unit_damage(
      model,
      batches,
      stage_cfg.probe_level,
      Progress("[router] probes", shape[0] * shape[1], printer=_log),
      greedy,
    )
    table = fit.allocate(
      damage, sparsity, stage_cfg.probe_level, max_sparsity=stage_cfg.max_sparsity
    )
  else:
    _, scores = fit.unit_scores(model, batches, greedy)
    caps = (
      np.asarray(s.routing.capacities)
      if s.routing.capacities is not None
      else np.full(shape, 1.0 - sparsity)
    )
    fit.center_routers(model, caps, scores)
    return info
  fit.set_table(model, table, scores)
  tab = CapacityTable.from_model(model)
  info.update(zip(("table_sparsity_attn", "table_sparsity_mlp"), tab.unit_sparsity()))
  _log(
    f"[router] capacity table ({alloc}, budget {stage_cfg.budget}; mean sparsity "
    f"{1 - tab.mean(1.0):.3f}): attention "
    f"{info['table_sparsity_attn']:.3f}, MLP {info['table_sparsity_mlp']:.3f}"
  )
  return info


def _warm_start_routers(
  stage_cfg: StageConfig, model: Llama, it: Iterator[dict[str, Any]], greedy: bool
) -> dict[str, float]:
  """Routers regress their oracle target (log forecast error; greedy: log |Unit(n)|^2) on
  the next `fit_batches` batches; returns the fit's R^2 per unit type to log."""
  target = (
    "log |Unit(n)|^2 (greedy: nothing replaces a skipped unit)"
    if greedy
    else ("log forecast error")
  )
  _log(f"[router] warm start: routers regress {target} over {stage_cfg.fit_batches} batches")
  m = fit.router_moments(
    model,
    _batches(it, stage_cfg.fit_batches),
    Progress("[router] statistics", stage_cfg.fit_batches, printer=_log),
    greedy,
  )
  r2 = fit.set_routers(model, m, stage_cfg.ridge)
  info = {
    "router_fit_r2_attn": float(r2[:, 0].mean()),
    "router_fit_r2_mlp": float(r2[:, 1].mean()),
  }
  _log(
    f"[router] fit R^2 of the log error: attention {info['router_fit_r2_attn']:.2f}, "
    f"MLP {info['router_fit_r2_mlp']:.2f}"
  )
  return info


def _fit_flops_table(
  s: Settings, stage_cfg: StageConfig, model: Llama, it: Iterator[dict[str, Any]]
) -> dict[str, float]:
  """The router stage's start under an executed-FLOPs budget (`routing.flops`): routers
  regress their oracle target (not for the static policy, which has none); then the table.
  allocation='error' (default, routed policies): each unit's error curve, weighted by its
  cost, with the curve parameter bisected to the budget. allocation='probe' and the
  static policy: every unit's loss damage when forecast alone is probed and
  `routing.allocate_flops` chooses per unit execute, forecast or route (static: execute or
  forecast). Measured on the demo at 0.85 of dense FLOPs (16 held-out batches): error
  curves 1.67x dense, probes 2.07x (the probes miss how forecasts compound when many
  units are forecast at once)."""
  policy = s.routing.policy
  greedy = policy == "greedy"
  routed = policy != "static"
  info = _warm_start_routers(stage_cfg, model, it, greedy) if routed else {}
  batches = _batches(it, stage_cfg.allocation_batches)
  shape = (model.config.num_layers, 2)
  n_units = shape[0] * shape[1]
  seq_len = s.stage_data("router").seq_len
  if routed and stage_cfg.allocation == "error":
    # Every unit keeps some execution; sparsity goes where the relative forecast error
    # its router leaves behind rises least per FLOP saved, until the budget is met.
    _log(
      f"[router] FLOPs budget {s.routing.flops:g} of dense: error-curve allocation weighted "
      f"by unit cost on {len(batches)} batch(es)"
    )
    scores, rel_err = fit.error_curves(model, batches, greedy)
    cost = unit_flops(model.config, seq_len)
    table = curves_for_flops(
      model.config,
      seq_len,
      s.routing.flops,
      # sp is capped: allocate_curves lifts its per-unit cap to a target above it
      lambda sp: fit.allocate_curves(
        scores,
        rel_err,
        min(sp, stage_cfg.max_sparsity),
        max_sparsity=stage_cfg.max_sparsity,
        unit_cost=cost,
      ),
      policy,
    )
    return _store_table(s, model, table, scores, seq_len, "error curves", info)
  _log(
    f"[router] FLOPs budget {s.routing.flops:g} of dense: probing the loss damage of each of "
    f"{n_units} units forecast alone on {len(batches)} batch(es)"
  )
  damage, scores = fit.unit_damage(
    model, batches, 1.0, Progress("[router] probes", n_units, printer=_log), greedy
  )
  err_shape = None
  if routed:
    curve_scores, rel_err = fit.error_curves(model, batches, greedy)
    err_shape = error_shape(curve_scores, rel_err)
  table = allocate_flops(
    model.config,
    seq_len,
    s.routing.flops,
    damage,
    err_shape,
    policy=policy,
    routed=routed,
    max_sparsity=stage_cfg.max_sparsity,
  )
  return _store_table(s, model, table, scores, seq_len, "loss probes", info)


def _store_table(
  s: Settings,
  model: Llama,
  table: np.ndarray,
  scores: np.ndarray,
  seq_len: int,
  how: str,
  info: dict[str, float],
) -> dict[str, float]:
  """Stores a FLOPs-budget table in the model (routers centred on it); logs its forms."""
  policy = s.routing.policy
  fit.set_table(model, table, scores)
  fl = table_flops(model.config, table, seq_len, policy)
  forms = dict(
    execute=int((table >= 1).sum()),
    forecast=int((table <= 0).sum()),
    route=int(((table > 0) & (table < 1)).sum()),
  )
  attn, mlp = CapacityTable.from_array(table).unit_sparsity()
  info.update(
    table_sparsity_attn=attn,
    table_sparsity_mlp=mlp,
    table_flops=fl,
    **{f"units_{k}": float(v) for k, v in forms.items()},
  )
  _log(
    f"[router] capacity table ({how}) for {s.routing.flops:g} of dense FLOPs: executes {fl:.3f} of "
    f"dense at {seq_len} tokens; units execute {forms['execute']}, forecast "
    f"{forms['forecast']}, route {forms['route']}; pair sparsity attention "
    f"{info['table_sparsity_attn']:.3f}, MLP {info['table_sparsity_mlp']:.3f}"
  )
  return info


def forecaster_report(model: Llama, batches: list[dict[str, Any]], path: str) -> dict[str, float]:
  """Explained variance per layer and unit on held-out ordinary tokens (segment starts
  excluded), written to `path` (JSON); returns the per-unit-type means to log."""
  ex = fit.explained(fit.forecast_error(model, batches))
  if jax.process_index() == 0:
    write_json(
      path,
      {
        "what": "1 - sum |LFF(n) - Unit(n)|^2 / sum |Unit(n)|^2 over held-out "
        "ordinary tokens (segment starts excluded), per layer",
        "tokens_batches": len(batches),
        "attn": [round(float(v), 4) for v in ex[:, 0]],
        "mlp": [round(float(v), 4) for v in ex[:, 1]],
      },
    )
  info = {
    "heldout_explained_attn": float(ex[:, 0].mean()),
    "heldout_explained_mlp": float(ex[:, 1].mean()),
  }
  _log(
    f"[forecaster] held-out explained variance (ordinary tokens): attention "
    f"{info['heldout_explained_attn']:.2f}, MLP {info['heldout_explained_mlp']:.2f} "
    f"(per layer: {path})"
  )
  return info
