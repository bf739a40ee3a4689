r"""`python -m ir_jax.lm_eval [lm-eval flags]`: lm-eval-harness's own command line with ir_jax registered.

lm-eval finds a model type only once something has imported the module that
registers it, and its `lm_eval` command imports nothing of ours. This entry
point imports `ir_jax.eval.lm_eval_adapter` (model type "ir_jax") and hands
argv to lm-eval's CLI unchanged, so every lm-eval flag works as documented
there. With no subcommand it runs `lm_eval run`. Example, offline, after the
demo, on the repository's local test task:

  python -m ir_jax.lm_eval --model ir_jax \
      --model_args pretrained=runs/demo,policy=informed,sparsity=0.25 \
      --tasks ir_jax_tiny_mc --include_path tests/data/lm_eval_task \
      --batch_size 1 --output_path runs/lm_eval

Model args: pretrained (a training workdir, checkpoint, HF directory or GGUF),
tokenizer (default: pretrained's own; a workdir's is the one its run trained
with, read from WORKDIR/base), policy, sparsity, mode (topk | causal),
calibration, ...: see `ir_jax.eval.lm_eval_adapter`.

Hub access: none. HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 are set before
lm-eval loads (unless already set in the environment), so lm-eval's stock tasks,
which download their data from the HuggingFace hub, fail. Give a local task
instead: a directory passed as --include_path holding a task YAML whose
`custom_dataset: !function utils.load` names a function in a utils.py beside it
that returns a datasets.DatasetDict read from local files (see
tests/data/lm_eval_task/ and docs/lm_eval.md for one to copy).
`python -m ir_jax.tasks prepare` writes multiple-choice reasoning tasks so (PIQA,
Social IQa, OpenBookQA, CommonsenseQA, ...; docs/tasks.md).
Scoring pads rows to a few bucket lengths (one compiled program each), prints
progress with rate and ETA, and ends with a line counting the programs compiled;
no stretch of the output is quiet for more than about 10 seconds.
Errors in ir_jax's part (a missing model, a bad model arg) print one line.
"""

from __future__ import annotations

import os
import sys

from ir_jax.errors import cli_main
from ir_jax.progress import Heartbeat

SUBCOMMANDS = ("run", "ls", "validate")


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Before lm-eval imports `datasets`, which reads these once: nothing may reach a hub.
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    from lm_eval.__main__ import cli_evaluate
  except ImportError:
    print(
      "ir_jax.lm_eval: error: lm-eval is not installed; pip install 'ir_jax[eval]'", file=sys.stderr
    )
    sys.exit(2)
  from ir_jax.eval import lm_eval_adapter  # noqa: F401  (registers model type "ir_jax")

  if argv and argv[0] in ("-h", "--help"):
    print(__doc__.strip() + "\n\nlm-eval's own help follows.\n", flush=True)
  elif argv and argv[0] not in SUBCOMMANDS:
    argv = ["run", *argv]  # lm-eval's subcommand for evaluating
  sys.argv = ["lm_eval", *argv]
  # Scoring prints progress and its compiles; "  ... WHAT (Ns so far)" fills any quiet
  # stretch of 8 s (a compile, lm-eval building its requests).
  with Heartbeat():
    cli_main(cli_evaluate, "ir_jax.lm_eval")


if __name__ == "__main__":
  main()
