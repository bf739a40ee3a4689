"""Importing the package, or reading a training config, loads no more than it needs.

Each check runs in a child process, so that what this test process has already
imported cannot hide an eager import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loaded_after(code: str) -> set[str]:
  """The modules in sys.modules after a fresh interpreter runs `code`."""
  probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
  out = subprocess.run(
    [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
  )
  return set(json.loads(out.stdout.splitlines()[-1]))


def test_importing_ir_jax_does_not_import_jax():
  loaded = _loaded_after("import ir_jax")
  assert "ir_jax" in loaded  # the probe sees what it imported
  assert "jax" not in loaded and "flax" not in loaded
  assert sorted(m for m in loaded if m.startswith("ir_jax")) == ["ir_jax"]


def test_public_names_still_import_and_list():
  loaded = _loaded_after(
    "import ir_jax\n"
    "from ir_jax import ConfigError, Llama, LlamaConfig, RoutingSpec, load_model\n"
    "assert set(ir_jax.__all__) <= set(dir(ir_jax)), dir(ir_jax)\n"
    "from ir_jax.config import LlamaConfig as L\n"
    "assert LlamaConfig is L and ir_jax.LlamaConfig is L\n"
    "from ir_jax.api import load_model as f\n"
    "assert load_model is f\n"
    "from ir_jax.model import Llama as M\n"
    "assert Llama is M\n"
    "assert ir_jax.sharding.RULES  # a submodule is reachable as an attribute, as before\n"
    "try:\n"
    "  ir_jax.no_such_name\n"
    "  raise SystemExit('an unknown name did not raise AttributeError')\n"
    "except AttributeError:\n"
    "  pass\n"
  )
  assert "jax" in loaded  # the public names do load the model code


def test_reading_a_train_config_loads_no_training_code():
  loaded = _loaded_after("import ir_jax.train.config")
  assert "ir_jax.train.config" in loaded
  for heavy in ("ir_jax.train.loop", "ir_jax.train.stages", "ir_jax.train.stepfns", "ir_jax.fit"):
    assert heavy not in loaded, heavy


def test_train_package_names_still_import():
  _loaded_after(
    "import ir_jax.train as T\n"
    "from ir_jax.train import (STAGES, Preempted, Settings, TrainConfig, TrainingError,\n"
    "  load_run_model, run, run_result, settings_from_config)\n"
    "from ir_jax.train.loop import run as r\n"
    "assert run is r and T.run is r\n"
    "assert set(T.__all__) <= set(dir(T))\n"
  )


def test_cli_main_loads_no_module_that_raises():
  loaded = _loaded_after("from ir_jax.errors import USER_ERRORS, cli_main")
  assert sorted(m for m in loaded if m.startswith("ir_jax")) == [
    "ir_jax",
    "ir_jax.base_error",
    "ir_jax.errors",
  ]
  assert "jax" not in loaded


def test_every_user_error_class_is_caught_by_cli_main(capsys):
  from ir_jax.checkpoint import CheckpointError
  from ir_jax.config import ConfigError
  from ir_jax.convert.export import ExportError
  from ir_jax.convert.safetensors_io import SafetensorsError
  from ir_jax.convert.sources import WeightImportError
  from ir_jax.data.config import DataError
  from ir_jax.errors import USER_ERRORS, cli_main
  from ir_jax.eval.estimator_inputs import EstimatorError
  from ir_jax.tokenizer import TokenizerError

  classes = (
    CheckpointError,
    ConfigError,
    DataError,
    EstimatorError,
    ExportError,
    SafetensorsError,
    TokenizerError,
    WeightImportError,
  )
  for cls in classes:
    assert issubclass(cls, ValueError), cls  # callers that catch ValueError still do

    def fail(cls=cls):
      raise cls("first line\nsecond line")

    with pytest.raises(SystemExit) as info:
      cli_main(fail, "prog")
    assert info.value.code == 2, cls
    assert capsys.readouterr().err == "prog: error: first line\n", cls
  assert isinstance(FileNotFoundError("x"), USER_ERRORS)

  def bug():
    raise ValueError("a plain ValueError is a bug, not a user error")

  with pytest.raises(ValueError):
    cli_main(bug, "prog")
