"""Quality under data shift, checked against truth: classifier density ratios between a
calibration pool A and unlabeled target documents B, four estimators, many resamples.

    python launch/shift_experiment.py --eval runs/budget/eval --heldout runs/budget/heldout
    python launch/shift_experiment.py ... --resamples 50 --docs /tmp/shift   # a quick look

Material: the per-document summed NLL of every setting (`python -m ir_jax.eval --json`, one
JSON per routed arm and budget, each with dense beside it) on the held-out sets `--sets`
(default valid,pydoc: disjoint documents of four domains), and the documents' texts (the
held-out JSONL each evaluation read, in the same order). No model runs here.

For each target (a scenario: how many documents of each domain A and B hold) and each
resample: A and B are drawn without replacement, disjoint; B's domain labels are then
forgotten. Weights w(x) = p_B(x) / p_A(x) at A's documents come from
`density_ratio.classifier_weights` on hashed word n-grams (`density_ratio.text_features`),
cross-fitted. Every estimator of `lr_estimates.target_perplexity` turns A's NLLs, the weights
and B's mean token count into B's perplexity with a 95 % prediction interval, for every
setting; the truth is the perplexity measured on B. Output: docs/shift.{json,md,png}
(bias, RMSE and coverage per target, setting and estimator).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices, a shared machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the checkout's own ir_jax, also where another one is installed

from ir_jax.experiments.shift import report, trials  # noqa: E402


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[2:]),
  )
  p.add_argument("--eval", default=os.path.join(REPO, "runs", "budget", "eval"))
  p.add_argument("--heldout", default=os.path.join(REPO, "runs", "budget", "heldout"))
  p.add_argument("--sets", default="valid,pydoc")
  p.add_argument("--resamples", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--docs", default=os.path.join(REPO, "docs"))
  args = p.parse_args(argv)
  data = trials.load(
    args.eval, args.heldout, [s.strip() for s in args.sets.split(",") if s.strip()]
  )
  print(f"{trials.PROG}: {len(data['texts'])} documents, settings {data['settings']}", flush=True)
  res = trials.run(data, args.resamples, args.seed)
  report.write(
    res,
    data,
    args.docs,
    eval_dir=args.eval,
    heldout=args.heldout,
    sets=args.sets,
    resamples=args.resamples,
    seed=args.seed,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
