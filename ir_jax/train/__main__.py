"""`python -m ir_jax.train --config configs/X.py [--config.a.b=value ...] --workdir DIR`."""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config file (configs/*.py) with sections model, data, train, routing, mesh. Override any "
    "field with --config.SECTION.FIELD=VALUE, e.g. --config.train.stages=forecaster "
    "--config.train.router.steps=500 --config.routing.policy=greedy "
    "--config.routing.sparsity=0.7 --config.mesh.fsdp=4 --config.data.batch_size=16.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Run directory for checkpoints, metrics.jsonl, tensorboard/ and eval.json. Rerunning the "
    "same command resumes from the newest checkpoint; SIGTERM saves one before exiting.")
flags.mark_flags_as_required(["config", "workdir"])

PROG = "ir_jax.train"
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped after a checkpoint; rerun to resume


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors for bad flags and config overrides."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = str(e).splitlines()[0]
  except (KeyError, AttributeError) as e:
    msg = f"a --config override names an unknown field: {str(e).strip(chr(34)).splitlines()[0]}"
  except (TypeError, ValueError) as e:
    msg = f"bad --config override: {str(e).splitlines()[0]}"
  print(f"{PROG}: error: {msg}\nTry --help for the flags; see configs/ for the fields.",
        file=sys.stderr)
  sys.exit(2)


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --config.* flag")
  from ir_jax.errors import USER_ERRORS
  from ir_jax.train import Preempted, TrainingError, run, settings_from_config

  cfg = _CONFIG.value
  try:
    cfg.keys()  # a file that failed to load raises here
  except OSError as e:  # the config file is missing or does not import
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"{PROG}: error: cannot load --config: {lines[-1] if lines else e}", file=sys.stderr)
    sys.exit(2)
  try:
    settings = settings_from_config(cfg)
    run(settings, _WORKDIR.value)
  except USER_ERRORS as e:
    print(f"{PROG}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
          file=sys.stderr)
    sys.exit(2)
  except TrainingError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    sys.exit(1)
  except Preempted as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
