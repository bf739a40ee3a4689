"""A training run directory (--workdir) as a reader sees it: run.json and the stage folders.

Below both `ir_jax.train` (which writes run directories) and `ir_jax.convert`,
`ir_jax.generate` and the API (which read them), so a reader needs no training
code to find out what a directory holds. Layout:

  run.json                   model config, base weights, the config (a rerun must match)
  base/                      the imported base model (when model.checkpoint is GGUF / HF)
  checkpoints/<stage>/<N>/   orbax CheckpointManager steps: adapters (forecasters,
                             routers, thresholds, LoRA), optimizer state, data iterator
                             state, metadata; N counts batches of that stage
  metrics.jsonl, tensorboard/, eval.json
"""

from __future__ import annotations

import os
from typing import Any

from ir_jax.config import ConfigError, read_json_object

RUN_FILE = "run.json"
RUN_FORMAT = "ir_jax.run"
RUN_VERSION = 1


def is_run(path: str) -> bool:
  """Whether `path` is a run directory (holds a run.json)."""
  return os.path.isfile(os.path.join(os.fspath(path), RUN_FILE))


def read_run(workdir: str) -> dict[str, Any] | None:
  """The run.json of `workdir`, checked to be one this version writes; None if absent."""
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return None
  meta = read_json_object(path, ConfigError)
  if meta.get("format") != RUN_FORMAT or meta.get("version") != RUN_VERSION:
    raise ConfigError(f"{path}: not an ir_jax run of format {RUN_FORMAT} v{RUN_VERSION}")
  return meta


def stage_dir(workdir: str, stage: str) -> str:
  """The checkpoint directory of `stage` in `workdir`."""
  return os.path.join(os.path.abspath(workdir), "checkpoints", stage)
