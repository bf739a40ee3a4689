"""`load_model`: one call for ir_jax checkpoints, HuggingFace directories and GGUF files."""

from __future__ import annotations

import os

from ir_jax import checkpoint, convert
from ir_jax.model import Llama
from ir_jax.rundir import is_run
from ir_jax.rundir.result import load_run_model


def load_model(path: str, *, dtype: str | None = None, param_dtype: str | None = None) -> Llama:
  """Returns a Llama whose call on int32 tokens `[B, T]` gives float logits `[B, T, V]`.

  `path`: an ir_jax checkpoint directory, an `ir_jax.train` workdir (its base
  weights with the newest trained forecasters, routers and LoRA), a
  HuggingFace Llama directory (config.json + safetensors) or a `.gguf` file. `dtype` / `param_dtype`
  override the compute and parameter dtypes ("float32", "bfloat16").
  """
  overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v}
  path = os.fspath(path)
  if is_run(path):
    if overrides:
      raise ValueError(
        "dtype overrides are not supported for training workdirs; the run's "
        "model config decides them"
      )
    return load_run_model(path)
  if os.path.isdir(path) and checkpoint.is_checkpoint(path):
    cfg = checkpoint.load_config(path).replace(**overrides)
    target = convert.abstract_params(cfg)
    params = checkpoint.restore_params(path, target)
    return convert.model_from_params(cfg, params)
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(
      f"{path}: neither an ir_jax checkpoint ({checkpoint.META_FILE}) nor a HuggingFace "
      "directory (config.json)"
    )
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  source = convert.open_source(path, None, **overrides)
  return convert.model_from_params(source.config, convert.read_params(source))
