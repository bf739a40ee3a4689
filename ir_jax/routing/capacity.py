"""`CapacityTable`: the one type for a per-unit capacity table, wherever it lives.

A table is the fraction of tokens each unit (layer, attention or MLP) executes, `[L, 2]`;
or it is absent, and the model routes at the uniform capacity its spec asks for. It is
stored in three forms, all read and written here:
  model state   `model.routing.capacity` (float32 `[L, 2]`; NO_TABLE (-1) everywhere: none)
  routing.json  `capacity_table.values` (a list of rows, or null: none)
  a spec        `RoutingSpec.capacities` (a tuple of rows, or None: uniform)
Checkpoints and exports written before tables existed have no such leaf; `backfill` is
the value they get (no table), in one place for every loader.

The allocation entry points (`allocate_curves`, `allocate`) turn per-unit damage into a
table by one greedy rule (`greedy_table`); `rescale` moves a table's mean sparsity.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import numpy as np

from ir_jax.config import ConfigError
from ir_jax.forecast import NO_TABLE, UNITS
from ir_jax.routing.spec import RoutingSpec, is_fraction

Rows = tuple[tuple[float, ...], ...]

# Routing leaves added after the first checkpoints were written, newest first: a
# checkpoint may lack the first n of them, and each absent one is back-filled.
LATER_ROUTING_LEAVES = ("calibrated_for", "capacity")


def backfill(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
  """The value of a capacity (or calibration) leaf a checkpoint or export was written
  without: no table (uniform routing, as the run that wrote it routed), never calibrated."""
  return np.full(shape, NO_TABLE, dtype)


def present(values: Any) -> Any:
  """Whether a stored table array is a table (no entry negative); works on traced arrays."""
  return (values >= 0).all()


@dataclasses.dataclass(frozen=True)
class CapacityTable:
  """A per-unit capacity table `[L][2]`, or none (`rows is None`: uniform routing)."""

  rows: Rows | None = None

  def __post_init__(self) -> None:
    if self.rows is not None:
      object.__setattr__(self, "rows", tuple(tuple(float(c) for c in r) for r in self.rows))

  # ------------------------------------------------------------ reading
  @classmethod
  def from_array(cls, values: Any) -> CapacityTable:
    """From a stored `[L, 2]` array (model state, a checkpoint leaf); negative: none."""
    caps = np.asarray(values, np.float64)
    if caps.ndim != 2 or not bool(present(caps)):
      return cls(None)
    return cls(tuple(tuple(float(c) for c in row) for row in caps))

  @classmethod
  def from_model(cls, model: Any) -> CapacityTable:
    """The model's trained table (`model.routing.capacity`)."""
    return cls.from_array(jax.device_get(model.routing.capacity[...]))

  @classmethod
  def from_spec(cls, spec: RoutingSpec) -> CapacityTable:
    return cls(spec.capacities)

  @classmethod
  def from_json(cls, values: list[list[float]] | None) -> CapacityTable:
    """From routing.json's `capacity_table.values` (null: none)."""
    return cls(None if values is None else tuple(tuple(r) for r in values))

  # ------------------------------------------------------------ writing
  def to_array(self, num_layers: int) -> np.ndarray:
    """The model-state form: float32 `[L, 2]`, NO_TABLE when there is no table."""
    if self.rows is None:
      return backfill((num_layers, len(UNITS)))
    return np.asarray(self.rows, np.float32)

  def to_json(self) -> list[list[float]] | None:
    return None if self.rows is None else [list(r) for r in self.rows]

  # ------------------------------------------------------------ facts
  @property
  def is_present(self) -> bool:
    return self.rows is not None

  def mean(self, uniform: float) -> float:
    """Mean capacity over units; `uniform` (the spec's 1 - sparsity) when there is no table."""
    return uniform if self.rows is None else float(np.mean(self.rows))

  def unit_sparsity(self) -> tuple[float, float]:
    """Mean sparsity of (attention, MLP) units; the table must be present."""
    tab = np.asarray(self.rows, np.float64)
    return float(1 - tab[:, 0].mean()), float(1 - tab[:, 1].mean())

  # ------------------------------------------------------------ moving
  def rescale(self, sparsity: float) -> CapacityTable:
    """This table with its mean sparsity moved to `sparsity` (`rescale_table`)."""
    return CapacityTable(rescale_table(self.rows, sparsity))

  def spec(self, spec: RoutingSpec) -> RoutingSpec:
    """`spec` routed with this table (unchanged when there is none)."""
    return spec if self.rows is None else dataclasses.replace(spec, capacities=self.rows)


def model_table(model: Any) -> Rows | None:
  """The model's trained per-unit capacity table, or None when it has none."""
  return CapacityTable.from_model(model).rows


def mean_capacity(spec: RoutingSpec) -> float:
  """The mean fraction of (token, unit) pairs a spec executes: its table's mean, or
  1 - sparsity (what the routers' prior and the sparsity penalty aim at)."""
  return CapacityTable.from_spec(spec).mean(1.0 - spec.sparsity)


def rescale_table(table: Iterable[Iterable[float]], sparsity: float) -> Rows:
  """The table with its mean sparsity moved to `sparsity`, keeping its shape.

  Every unit's sparsity is multiplied by one factor (units the table keeps
  dense stay dense); units that would pass 1 are clipped and the rest are
  scaled again until the mean is exact. A table with no sparsity at all
  becomes uniform.
  """
  caps = np.asarray(list(map(list, table)), np.float64)
  s = 1.0 - caps
  if not is_fraction(sparsity):
    raise ConfigError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
  if s.mean() <= 1e-12:
    out = np.full_like(s, sparsity)
  else:
    out = s.copy()
    for _ in range(len(s.ravel()) + 1):
      free = out < 1.0 - 1e-12
      fixed = out[~free].sum()
      want = sparsity * s.size - fixed
      base = s[free].sum()
      if base <= 1e-12:
        break
      out = np.where(free, s * want / base, 1.0)
      if (out <= 1.0 + 1e-12).all():
        break
      out = np.minimum(out, 1.0)
    out = np.clip(out, 0.0, 1.0)
  return tuple(tuple(float(1.0 - v) for v in row) for row in out)


# ------------------------------------------------------------ allocation
def greedy_marginal(
  x: np.ndarray,
  budget: float,
  w: np.ndarray,
  step: float,
  limit: float,
  price: Callable[[np.ndarray, np.ndarray], np.ndarray],
  max_rounds: int | None = None,
) -> np.ndarray:
  """Greedy marginal allocation: `x` (one amount per unit) raised `step` at a time (less
  where a unit meets `limit`) at the unit whose `price(x, inc)` is least, each unit of
  amount spending `w` of `budget`, until the budget is spent (the last increment is
  partial), no unit is finite-priced, or `max_rounds` increments. `price` is the change
  of the objective per unit of budget spent (+inf: the unit may not grow). Returns the
  raised copy of `x`."""
  x = x.copy()
  rounds = 0
  while budget > 1e-12 and (max_rounds is None or rounds < max_rounds):
    rounds += 1
    inc = np.minimum(step, limit - x)
    cost = price(x, inc)
    j = np.unravel_index(np.argmin(cost), x.shape)
    if not np.isfinite(cost[j]):
      break
    add = min(inc[j], budget / w[j])
    x[j] += add
    budget -= add * w[j]
  return x


def greedy_table(
  curve: Callable[[np.ndarray], np.ndarray],
  w: np.ndarray,
  sparsity: float,
  step: float,
  max_sparsity: float,
) -> np.ndarray:
  """Capacities `[L, 2]`: add sparsity `step` at a time to the unit whose damage
  `curve(s)` rises least per unit of weight `w`, until the w-weighted mean sparsity is
  `sparsity`; no unit passes `max_sparsity`; the last increment is partial."""

  def price(s: np.ndarray, inc: np.ndarray) -> np.ndarray:  # damage rise per unit of weight
    rise = (curve(s + inc) - curve(s)) / np.maximum(inc * w, 1e-12)
    return np.where(inc <= 1e-12, np.inf, rise)

  # the budget is in units of pairs (or of the dearer unit's FLOPs)
  s = greedy_marginal(
    np.zeros(w.shape), sparsity * w.sum(), w, step, max(max_sparsity, sparsity), price
  )
  return 1.0 - s


def allocate_curves(
  scores: np.ndarray,
  rel_err: np.ndarray,
  sparsity: float,
  step: float = 1 / 16,
  max_sparsity: float = 0.875,
  unit_cost: tuple[float, float] | None = None,
) -> np.ndarray:
  """Per-unit capacities `[L, 2]` from damage curves, at mean sparsity `sparsity`.

  A unit's damage at sparsity s is the summed relative forecast error of the
  s-fraction of tokens its router approximates (lowest scores): the residual
  perturbation approximating leaves behind. Sparsity goes `step` at a time to
  the unit whose curve rises least; the last increment is partial.

  With `unit_cost` (FLOPs one token saves per approximated (attention, MLP)
  unit, `routing.unit_flops`) the budget is compute instead: the table saves
  what a uniform `sparsity` saves, and an increment is ranked by damage per
  FLOP saved (its mean pair sparsity then differs from `sparsity`).
  """
  num_l, num_u, n = rel_err.shape
  order = np.argsort(scores, axis=-1, kind="stable")
  cum = np.concatenate(
    [np.zeros((num_l, num_u, 1)), np.cumsum(np.take_along_axis(rel_err, order, -1), -1) / n], -1
  )

  def curve(s: np.ndarray) -> np.ndarray:  # damage at sparsity s per unit, interpolated
    pos = np.clip(s, 0.0, 1.0) * n
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n)
    frac = pos - lo
    a = np.take_along_axis(cum, lo[..., None], -1)[..., 0]
    b = np.take_along_axis(cum, hi[..., None], -1)[..., 0]
    return a + frac * (b - a)

  w = (
    np.ones((num_l, num_u))
    if unit_cost is None
    else np.broadcast_to(np.asarray(unit_cost, np.float64) / max(unit_cost), (num_l, num_u))
  )
  return greedy_table(curve, w, sparsity, step, max_sparsity)


def allocate(
  damage: np.ndarray,
  sparsity: float,
  level: float,
  step: float = 1 / 16,
  max_sparsity: float = 0.875,
) -> np.ndarray:
  """Per-unit capacities `[L, 2]` whose mean sparsity is `sparsity`, from probed damage.

  Models a unit's loss increase at sparsity s as damage (s / level)^2 (convex:
  the router gives up its cheapest tokens first) and adds sparsity `step` at a
  time where the marginal increase is smallest; no unit goes past
  `max_sparsity`. The last increment is partial, so the mean is exact.
  """
  d = np.maximum(np.asarray(damage, np.float64), 0.0)
  d = np.maximum(d, 1e-3 * max(d.max(), 1e-9))  # noise-level damage: cheap, not free
  return greedy_table(lambda s: d * (s / level) ** 2, np.ones_like(d), sparsity, step, max_sparsity)
