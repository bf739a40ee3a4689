r"""`python -m ir_jax.lm_eval [lm-eval flags]`: lm-eval-harness's own command line with ir_jax registered.

lm-eval finds a model type only once something has imported the module that
registers it, and its `lm_eval` command imports nothing of ours. This entry
point imports `ir_jax.eval.lm_eval_adapter` (model type "ir_jax") and hands
argv to lm-eval's CLI unchanged, so every lm-eval flag works as documented
there. With no subcommand it runs `lm_eval run`. Example, offline, on the
repository's local test tasks:

  python -m ir_jax.lm_eval --model ir_jax \
      --model_args pretrained=runs/demo,policy=informed,sparsity=0.25 \
      --tasks ir_jax_tiny_mc --include_path tests/data/lm_eval_task \
      --limit 8 --output_path runs/lm_eval

Model args: see `ir_jax.eval.lm_eval_adapter` (pretrained, tokenizer, policy,
sparsity, mode, calibration, ...).
"""

from __future__ import annotations

import sys

SUBCOMMANDS = ("run", "ls", "validate")


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
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
  cli_evaluate()


if __name__ == "__main__":
  main()
