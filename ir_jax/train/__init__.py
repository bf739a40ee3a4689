"""Training: forecaster, router and LoRA stages on a device mesh, with exact resume.

`python -m ir_jax.train --config configs/X.py --workdir DIR`; in Python,
`run(settings_from_config(cfg), workdir)`. The names below load on first use
(PEP 562), so importing a submodule such as `ir_jax.train.config` loads no
training code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from ir_jax.rundir.result import load_run_model, run_result
  from ir_jax.train.config import STAGES, Settings, TrainConfig, settings_from_config
  from ir_jax.train.loop import Preempted, TrainingError, run

# public name -> the module that defines it
_LAZY = {
  "STAGES": "ir_jax.train.config",
  "Settings": "ir_jax.train.config",
  "TrainConfig": "ir_jax.train.config",
  "settings_from_config": "ir_jax.train.config",
  "Preempted": "ir_jax.train.loop",
  "TrainingError": "ir_jax.train.loop",
  "run": "ir_jax.train.loop",
  "load_run_model": "ir_jax.rundir.result",
  "run_result": "ir_jax.rundir.result",
}

__all__ = [
  "STAGES",
  "Settings",
  "TrainConfig",
  "settings_from_config",
  "Preempted",
  "TrainingError",
  "load_run_model",
  "run",
  "run_result",
]


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module 'ir_jax.train' has no attribute {name!r}")
  value = getattr(importlib.import_module(_LAZY[name]), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
