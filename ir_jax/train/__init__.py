"""Training: forecaster, router and LoRA stages on a device mesh, with exact resume.

`python -m ir_jax.train --config configs/X.py --workdir DIR`; in Python,
`run(settings_from_config(cfg), workdir)`.
"""

from ir_jax.train.config import STAGES, Settings, TrainConfig, settings_from_config
from ir_jax.train.loop import Preempted, TrainingError, run
from ir_jax.train.rundir import load_run_model, run_result

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
