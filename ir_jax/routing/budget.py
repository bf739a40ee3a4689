"""Capacity tables for an executed-FLOPs budget: which units execute, forecast or route.

Every unit takes one of three forms (`ir_jax.routing.cost`): execute (capacity 1:
the unit alone), forecast (capacity 0: its forecaster; segment starts execute) or
route at a capacity c (forecaster + router + c of the unit). `allocate_flops`
chooses a form per unit so the table's executed FLOPs (forecasters and routers
included) meet a budget, minimising the summed damage to the LM loss:

  forecast   the measured loss increase when that unit alone is forecast
             (`damage`, one probe per unit on training batches);
  route c    that damage times the share of the unit's forecast error left on the
             1 - c tokens its router ranks lowest (`error_shape`): the loss probe
             says how much a unit matters, the error curve where inside it.

A multiple-choice knapsack (dynamic programming over the budget in small cost
steps) picks the forms of least summed damage; the slack the discrete choice
leaves is given to the routed units whose damage falls fastest per FLOP. With no routed form allowed (`routed=False`) this is the static baseline:
unit pruning with forecasts, at the same budget and by the same measurements.
`table_for_flops` moves an existing table to another budget, and `trained_spec`
is the one rule every entry point routes a trained model by.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.forecast import UNITS
from ir_jax.model import Llama
from ir_jax.routing.capacity import CapacityTable, greedy_marginal, rescale_table
from ir_jax.routing.cost import flops, form_flops, token_flops, unit_flops
from ir_jax.routing.spec import RoutingSpec

# Capacities a routed unit may take (a grid fine enough that the budget is met closely).
GRID = 64
# A table within this of a budget is taken as allocated for it (top-k rounds each unit's
# count to whole tokens); a static table (whole units) within STATIC_SLACK below or above.
BUDGET_TOL = 0.005
STATIC_SLACK = 0.02


def error_shape(scores: np.ndarray, rel_err: np.ndarray) -> np.ndarray:
  """`[L, 2, n + 1]`: the share of each unit's summed forecast error carried by its j
  lowest-scored tokens (what its router approximates first), j = 0..n; 1 at j = n."""
  order = np.argsort(scores, axis=-1, kind="stable")
  err = np.take_along_axis(np.asarray(rel_err, np.float64), order, -1)
  cum = np.concatenate([np.zeros(err.shape[:-1] + (1,)), np.cumsum(err, -1)], -1)
  return cum / np.maximum(cum[..., -1:], 1e-30)


def _shape_at(shape: np.ndarray, s: np.ndarray) -> np.ndarray:
  """`shape` `[L, 2, n + 1]` interpolated at sparsities `s` `[..., L, 2]` (broadcast)."""
  n = shape.shape[-1] - 1
  pos = np.clip(s, 0.0, 1.0) * n
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n)
  frac = pos - lo
  sh = np.broadcast_to(shape, s.shape + (n + 1,))
  a = np.take_along_axis(sh, lo[..., None], -1)[..., 0]
  b = np.take_along_axis(sh, hi[..., None], -1)[..., 0]
  return a + frac * (b - a)


def table_flops(cfg: LlamaConfig, table: np.ndarray, seq_len: int, policy: str) -> float:
  """Executed FLOPs fraction of a table as top-k routing runs it (static counts)."""
  caps = tuple(tuple(float(c) for c in row) for row in np.asarray(table))
  return flops(cfg, RoutingSpec(policy=policy, capacities=caps), seq_len)["executed_fraction"]


def allocate_flops(
  cfg: LlamaConfig,
  seq_len: int,
  budget: float,
  damage: np.ndarray,
  shape: np.ndarray | None,
  policy: str = "informed",
  routed: bool = True,
  max_sparsity: float = 1.0,
) -> np.ndarray:
  """Capacities `[L, 2]` whose executed FLOPs fraction is at most `budget` (within one
  top-k token of it when a unit routes), chosen to minimise estimated loss damage.

  damage `[L, 2]`: loss increase when each unit alone is forecast; shape: `error_shape`
  (None with `routed=False`). Routed capacities lie in [1 - max_sparsity, 1).
  """
  num_l, num_u = np.asarray(damage).shape
  if (num_l, num_u) != (cfg.num_layers, len(UNITS)):
    raise ValueError(f"damage has shape {(num_l, num_u)}; the model has {cfg.num_layers} x 2")
  if routed and shape is None:
    raise ValueError("routed forms need the units' error shapes")
  d = np.maximum(np.asarray(damage, np.float64), 0.0)
  d = np.maximum(d, 1e-4 * max(d.max(), 1e-9))  # noise-level damage: cheap, not free
  dense_tok = flops(cfg, RoutingSpec(policy="dense"), seq_len)["dense"] / seq_len
  # Options per unit: capacity, cost (fraction of dense), damage.
  caps = [1.0, 0.0]
  if routed:
    lo = max(1.0 - max_sparsity, 1.0 / GRID)
    caps += [c for c in np.arange(1, GRID) / GRID if c >= lo - 1e-12]
  caps_o = np.asarray(caps)  # [O]
  cost = np.array(
    [[[form_flops(cfg, seq_len, u, c, policy) / dense_tok for c in caps] for u in range(num_u)]]
    * num_l
  )  # [L, 2, O]
  harm = np.zeros((num_l, num_u, len(caps)))
  harm[..., 1] = d
  if routed:
    s = np.broadcast_to(1.0 - caps_o[2:], (num_l, num_u, len(caps) - 2))
    frac = _shape_at(shape, np.moveaxis(s, -1, 0))  # [O', L, 2]
    harm[..., 2:] = d[..., None] * np.moveaxis(frac, 0, -1)
  fixed = token_flops(cfg, seq_len)["head"] / dense_tok  # the output head always runs

  floor = fixed + cost.min(-1).sum()
  if budget < floor - 1e-9:
    raise ConfigError(
      f"a FLOPs budget of {budget:.3f} of dense is below the cheapest table "
      f"({floor:.3f}: every unit forecast{' or routed' if routed else ''}); raise routing.flops"
    )
  pick = _knapsack(cost.reshape(-1, len(caps)), harm.reshape(-1, len(caps)), budget - fixed)
  pick = pick.reshape(num_l, num_u)

  def spent(p: np.ndarray) -> float:
    return fixed + np.take_along_axis(cost, p[..., None], -1).sum()

  table = caps_o[pick].astype(np.float64)
  # Slack: raise routed units' capacities (continuously) where damage falls fastest per FLOP.
  slack = budget - spent(pick)
  if routed and slack > 0:
    table = _fill(table, slack, d, shape, cfg, seq_len, dense_tok)
  return table


def _knapsack(cost: np.ndarray, harm: np.ndarray, avail: float, bins: int = 4096) -> np.ndarray:
  """The option per unit (`cost`, `harm` `[N, O]`) of least summed harm whose summed cost is
  at most `avail`: a multiple-choice knapsack by dynamic programming over `bins` cost
  steps (costs rounded up, so the choice never exceeds `avail`)."""
  n, o = cost.shape
  step = max(avail, 1e-12) / bins
  c = np.ceil(cost / step - 1e-9).astype(np.int64)
  best = np.zeros(bins + 1)  # least harm with at most b steps spent, units so far
  choice = np.zeros((n, bins + 1), np.int32)
  for i in range(n):
    new = np.full(bins + 1, np.inf)
    arg = np.zeros(bins + 1, np.int32)
    for j in range(o):
      if c[i, j] > bins:
        continue
      cand = np.full(bins + 1, np.inf)
      cand[c[i, j] :] = best[: bins + 1 - c[i, j]] + harm[i, j]
      better = cand < new
      new[better], arg[better] = cand[better], j
    best, choice[i] = new, arg
  if not np.isfinite(best[bins]):
    raise ConfigError("no capacity table meets this FLOPs budget")
  pick = np.zeros(n, np.int64)
  b = bins
  for i in range(n - 1, -1, -1):
    pick[i] = choice[i, b]
    b -= c[i, pick[i]]
  return pick


def _fill(table, slack, d, shape, cfg, seq_len, dense_tok) -> np.ndarray:
  """Spends `slack` (a fraction of dense FLOPs) on routed units' capacities, where damage
  falls fastest per FLOP."""
  routed = (table > 0) & (table < 1)  # executed and forecast units keep their form
  # a routed unit's FLOPs grow by its skippable work per unit of capacity
  per_cap = np.broadcast_to(np.asarray(unit_flops(cfg, seq_len)) / dense_tok, table.shape)

  def price(c: np.ndarray, inc: np.ndarray) -> np.ndarray:  # damage change per FLOP (< 0)
    gain = d * (_shape_at(shape, 1.0 - c) - _shape_at(shape, 1.0 - c - inc))
    return np.where(routed & (inc > 0), -gain / np.maximum(inc * per_cap, 1e-30), np.inf)

  return greedy_marginal(table, slack, per_cap, 1.0 / (4 * GRID), 1.0 - 1e-9, price, 100_000)


def unit_step(cfg: LlamaConfig, seq_len: int, policy: str = "informed") -> float:
  """The largest share of dense FLOPs one unit saves when forecast instead of executed:
  how closely a table of whole units (0/1 capacities) can meet a budget."""
  steps = []
  for u in range(2):
    t = np.ones((cfg.num_layers, 2))
    t[0, u] = 0.0
    steps.append(1.0 - table_flops(cfg, t, seq_len, policy))
  return max(steps)


def table_for_flops(
  cfg: LlamaConfig,
  table: Iterable[Iterable[float]],
  budget: float,
  seq_len: int,
  policy: str = "informed",
) -> tuple[tuple[float, float], ...]:
  """`table` moved to an executed-FLOPs `budget`: its routed and forecast units' sparsities
  scaled by one factor (`rescale_table`), the factor bisected until the table's FLOPs
  fraction meets the budget; units it executes stay executed. Raises when the budget is
  outside what scaling can reach."""
  base = np.asarray(list(map(list, table)), np.float64)
  hi_s = float(1.0 - base.mean())

  def at(sp: float) -> tuple[tuple[float, ...], ...]:
    return rescale_table(base, sp)

  def frac(sp: float) -> float:
    return table_flops(cfg, np.asarray(at(sp)), seq_len, policy)

  now = frac(hi_s)
  static = bool(np.all((base == 0) | (base == 1)))
  # Whole units cannot meet a budget closer than one unit's switch from execute to forecast.
  slack = max(STATIC_SLACK, unit_step(cfg, seq_len, policy)) if static else BUDGET_TOL
  if abs(now - budget) <= slack:
    return tuple((float(a), float(m)) for a, m in base)  # the budget it was allocated for
  if static:
    raise ConfigError(
      f"the model's capacity table executes or forecasts whole units ({now:.3f} of dense "
      f"FLOPs at seq_len {seq_len}); it cannot be moved to {budget:.3f}: train a static "
      "run at that budget"
    )
  lo, hi = (0.0, hi_s) if budget > now else (hi_s, 1.0)
  f_lo, f_hi = frac(lo), frac(hi)
  if not (f_hi - 1e-9 <= budget <= f_lo + 1e-9):
    raise ConfigError(
      f"the model's capacity table reaches executed-FLOPs fractions {f_hi:.3f}..{f_lo:.3f} "
      f"at seq_len {seq_len}; {budget:.3f} is outside them"
    )
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    if frac(mid) > budget:
      lo = mid
    else:
      hi = mid
  return tuple((float(a), float(m)) for a, m in at(hi))


def trained_spec(
  model: Llama, spec: RoutingSpec, sparsity: float | None = None, seq_len: int | None = None
) -> RoutingSpec:
  """`spec` routed with the model's trained capacity table, when the model has one and the
  spec names no table (otherwise `spec` unchanged, or an error for a FLOPs budget the
  model has no table for).

  With a FLOPs budget (`spec.flops`, needs `seq_len`: attention work grows with it)
  the table is moved to that budget (`table_for_flops`; unchanged at the budget it was
  trained for); otherwise its pair sparsity is moved to `sparsity` (default the spec's).
  """
  if spec.capacities is not None or spec.policy == "dense":
    return spec
  table = CapacityTable.from_model(model)
  if spec.flops:
    if seq_len is None:
      raise ValueError("trained_spec: a FLOPs budget needs the sequence length (seq_len)")
    if not table.is_present:
      raise ConfigError(
        f"routing.flops={spec.flops:g} needs the model's capacity table, and this model has "
        "none: train its router stage with routing.flops set, or route by routing.sparsity"
      )
    # The oracle runs every unit to rank tokens (an analysis bound, not a deployable cost):
    # it takes the table informed routing would run at this budget.
    cost_policy = "informed" if spec.policy == "oracle" else spec.policy
    moved = table_for_flops(model.config, table.rows, spec.flops, seq_len, cost_policy)
    return CapacityTable(moved).spec(spec)
  if not table.is_present:
    return spec
  return table.rescale(spec.sparsity if sparsity is None else sparsity).spec(spec)


def curves_for_flops(
  cfg: LlamaConfig,
  seq_len: int,
  budget: float,
  allocate: Callable[[float], np.ndarray],
  policy: str = "informed",
) -> np.ndarray:
  """The table `allocate(s)` gives (an error-curve allocation whose FLOPs fall as its
  parameter s rises, e.g. `fit.allocate_curves` with unit costs) at the s that meets an
  executed-FLOPs `budget`, by bisection; raises when even s = 1 spends more."""
  lo, hi = 0.0, 1.0
  if table_flops(cfg, allocate(hi), seq_len, policy) > budget + BUDGET_TOL:
    raise ConfigError(
      f"the error-curve allocation cannot reach {budget:.3f} of dense FLOPs (it keeps every "
      "unit partly executed); use train.router.allocation='probe' or raise routing.flops"
    )
  for _ in range(40):
    mid = 0.5 * (lo + hi)
    if table_flops(cfg, allocate(mid), seq_len, policy) > budget:
      lo = mid
    else:
      hi = mid
  return allocate(hi)
