"""A config section (a dict) built into its dataclass; the `routing` section into a RoutingSpec.

Below `ir_jax.train.config` (which validates whole configs with these) and
`ir_jax.convert` (which reads the spec a training run's run.json names), so reading
a run's routing needs no training code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ir_jax.config import ConfigError
from ir_jax.routing import RoutingSpec

# The routing section: the policy and target the routers train for and the run is evaluated at.
ROUTING_FIELDS = ("policy", "sparsity", "flops", "capacities", "k_multiple", "seed")


def build_section(kind: type, d: dict[str, Any], where: str) -> Any:
  """`kind(**d)`; an unknown field or a bad argument is a ConfigError naming `where`."""
  names = {f.name for f in dataclasses.fields(kind)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ConfigError(f"unknown {where} config fields {unknown}; known: {sorted(names)}")
  try:
    return kind(**d)
  except TypeError as e:
    raise ConfigError(f"{where}: {e}") from None


def routing_spec(d: dict[str, Any]) -> RoutingSpec:
  """The RoutingSpec of a config's `routing` section (ConfigError names a bad field)."""
  d = dict(d)
  unknown = sorted(set(d) - set(ROUTING_FIELDS))
  if unknown:
    raise ConfigError(
      f"unknown routing config fields {unknown}; known: {list(ROUTING_FIELDS)} "
      "(gates and modes follow the stage: see train.router.gate)"
    )
  caps = d.get("capacities")
  if isinstance(caps, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in caps):
    d["capacities"] = tuple(tuple(r) for r in caps)  # hashable; RoutingSpec checks the rest
  return build_section(RoutingSpec, d, "routing")
