"""Every entry point's --help exits 0; the absl ones list a config's fields and give
one-line errors for a bad override."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest
from conftest import train_cli

pytestmark = pytest.mark.slow  # one interpreter (jax import) per entry point

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = (
  "ir_jax.train",
  "ir_jax.eval",
  "ir_jax.eval.shift",
  "ir_jax.data",
  "ir_jax.convert",
  "ir_jax.aot",
  "ir_jax.bench",
  "ir_jax.perplexity",
  "ir_jax.generate",
  "ir_jax.tasks",
)


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_exits_zero(module):
  proc = _run(module, "--help")
  assert proc.returncode == 0, proc.stderr
  assert "usage" in proc.stdout.lower() or "--config" in proc.stdout


@pytest.mark.parametrize("module", ["ir_jax.train", "ir_jax.aot"])
def test_help_with_a_config_lists_its_fields(module):
  proc = _run(module, "--help", "--config", "configs/tiny.py")
  assert proc.returncode == 0, proc.stderr
  # Values from the file itself, loaded here without the CLI.
  cfg = runpy.run_path(os.path.join(REPO, "configs", "tiny.py"))["get_config"]()
  assert f"--config.train.stages={cfg.train.stages!r}\n" in proc.stdout
  assert f"--config.routing.sparsity={cfg.routing.sparsity!r}\n" in proc.stdout
  assert f"--config.train.router.steps={cfg.train.router.steps!r}\n" in proc.stdout
  assert "(required)" in proc.stdout and "default: 'None'" not in proc.stdout


def test_unknown_override_is_one_line_naming_the_field(tmp_path):
  proc = train_cli(str(tmp_path / "w"), "train.stagez=x", config="configs/tiny.py", timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert "'stagez'" in lines[0] and '"stages"' in lines[0] and "\\n" not in lines[0]
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
  "argv",
  [
    ("ir_jax.train", "--config", "configs/tiny.py", "--workdir", "gs://bucket/runs/t"),
    (
      "ir_jax.train",
      "--config",
      "configs/tiny.py",
      "--workdir",
      "{tmp}/w",
      "--config.data.data_dir=gs://bucket/tfds",
    ),
    ("ir_jax.eval", "--model", "gs://bucket/ckpt", "--data", "x.txt", "--json", "{tmp}/o.json"),
    (
      "ir_jax.data",
      "prepare",
      "--config",
      "configs/tiny.py",
      "--config.data.data_dir=gs://bucket/tfds",
    ),
    ("ir_jax.convert", "import", "--format", "hf", "gs://bucket/hf", "--out", "{tmp}/o"),
    ("ir_jax.perplexity", "--model", "gs://bucket/m.gguf", "--text", "x.txt"),
  ],
)
def test_bucket_paths_are_refused_in_one_line_naming_gcsfuse(argv, tmp_path):
  proc = _run(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert "gs://bucket/" in lines[0] and "gcsfuse" in lines[0]
  assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_capacity_table_from_the_command_line(monkeypatch):
  """routing.capacities defaults to None yet takes a table as a flag (a typed placeholder)."""
  from absl import flags
  from ml_collections import config_flags

  from ir_jax.train.config import settings_from_config

  def parse(*overrides):
    argv = ["prog", f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads overrides from sys.argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv)
    fv(argv)
    return settings_from_config(fv.config)

  table = "((0.5, 0.7), (0.6, 0.8))"  # configs/tiny.py has 2 layers
  assert parse(f"--config.routing.capacities={table}").routing.capacities == (
    (0.5, 0.7),
    (0.6, 0.8),
  )
  assert parse().routing.capacities is None
