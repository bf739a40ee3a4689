"""Closed-form fits from streamed statistics, one module per thing fitted: forecasters
(`forecasters`), router warm starts (`routers`), capacity tables (`tables`); `common` holds
the dense statistics pass they share. The allocation of a table from damage
(`allocate_curves`, `allocate`) lives with the table type, `ir_jax.routing.capacity`."""

from __future__ import annotations

from ir_jax.fit.common import OFFSET, SCORE_SCALE
from ir_jax.fit.forecasters import (
  explained,
  forecast_error,
  forecaster_moments,
  set_forecasters,
  solve_forecaster,
)
from ir_jax.fit.routers import center_routers, router_moments, set_routers, solve_router
from ir_jax.fit.tables import (
  error_curves,
  routed_nll,
  set_table,
  unit_damage,
  unit_scores,
)
from ir_jax.routing.capacity import allocate, allocate_curves

__all__ = [
  "OFFSET",
  "SCORE_SCALE",
  "allocate",
  "allocate_curves",
  "center_routers",
  "error_curves",
  "explained",
  "forecast_error",
  "forecaster_moments",
  "routed_nll",
  "router_moments",
  "set_forecasters",
  "set_routers",
  "set_table",
  "solve_forecaster",
  "solve_router",
  "unit_damage",
  "unit_scores",
]
