"""The quality table: informed vs greedy routing on SmolLM2-135M, end to end, resumable.

    python launch/quality_table.py                   # the real run (about 3 h 20 min, see below)
    python launch/quality_table.py --lora --causal   # + greedy+LoRA arms, + causal-mode rows
    python launch/quality_table.py --report-only     # rebuild docs/results.{json,md,png}
    python launch/quality_table.py --dry-run         # print the plan, commands and estimate
    python launch/quality_table.py --smoke --runs /tmp/qt --docs /tmp/qt/docs   # ~1-2 min test

Steps (each one subprocess, its output in RUNS/logs/<step>.log, one console line):
  1. held-out sets -> RUNS/heldout/{valid,wiki}.jsonl (+ .json manifest):
     `valid`: the config's validation split (the training domains, Shakespeare
     and news, documents the routers never saw); `wiki`: Wikipedia articles
     (assets/text/wiki/enwiki_articles.jsonl, a domain never trained on).
     Capped: documents taken round-robin over domains, in split/file order,
     each cut (at a line or word boundary) to its first --eval-doc-tokens
     tokens, until --eval-max-tokens tokens (and at most --eval-max-documents
     documents) per set. Defaults: 4,096 tokens per document, 24,576 per set
     (valid: all ~9k news tokens + ~11k Shakespeare; wiki: ~7 articles).
  2. forecasters: `python -m ir_jax.train --config configs/smollm2_135m.py
     --workdir RUNS/forecaster --config.train.stages=forecaster ...` (the
     config's Shakespeare + news train split, its batch of 4 x --seq-len).
  3. routers, for policy in --policies x sparsity in --sparsity, all from the
     forecasters (`--config.train.init_from=RUNS/forecaster`), with the same
     steps, batch and seed: RUNS/router_{policy}_{sparsity}. With --lora, a
     LoRA stage on every greedy arm: RUNS/lora_greedy_{sparsity}.
  4. `python -m ir_jax.eval` on both held-out sets (mode topk; --causal adds
     causal, thresholds calibrated on the config's train split): dense once
     (RUNS/forecaster); the informed arm with policies informed, random,
     oracle; the greedy arm with greedy; the LoRA arm with greedy (labelled
     greedy+lora). -> RUNS/eval/<set>/<arm>.json
  5. report: docs/results.json (every record, arm training times from each
     train_summary.json, commands, git commit), docs/results.md (table,
     plot, commands, commit, a "Reading" placeholder), docs/results.png.
     `--report-only` redoes only this from the JSON files.

Training time of a row: the sum of `train_s` (training wall seconds, over
resumes) in its workdir's train_summary.json, plus what it builds on: informed
rows add the forecasters' time (they need them), greedy rows do not (they
skip), greedy+lora rows add the greedy routers' time, random/oracle rows are the
forecasters' time alone.

Resuming. A step is skipped when its output is complete: a train workdir with
train_summary.json whose stages all reached their step count, an eval JSON
with every requested setting, a held-out manifest. A killed run, rerun with the
same command, continues (ir_jax.train resumes from its checkpoints; Ctrl-C or
SIGTERM makes the running ir_jax.train save a checkpoint before it stops).
RUNS/plan.json keeps the options; a rerun with other budgets is refused (the
lists --sparsity, --policies, --lora, --causal may grow).

Defaults and expected time on a 2-core CPU (rates measured there: forecaster
stage ~470 tokens/s, router stage with Gumbel gates ~160 tokens/s since every
unit is computed, SmolLM2 forward ~500 tokens/s; LoRA stage assumed ~250
tokens/s; ~90 s start-up per training run, ~20 s per eval run + ~15 s compile
per setting):
  forecasters  --forecaster-steps 800 x 4 x 256 tokens        ~29 min
  routers      6 arms x --router-steps 400 x --router-batch 2 x 256 tokens   ~2 h 08 min
  evaluation   2 sets x 13 settings x <=24,576 tokens          ~20 min
  overheads    7 training runs, 14 eval runs, 26 compiles     ~21 min
  total        about 3 h 20 min (--dry-run prints the estimate for other options);
  --lora adds 3 x --lora-steps 200 x 2 x 256 tokens + 6 settings: ~35 min;
  --causal doubles the routed settings: ~+25 min.

--smoke: configs/tiny.py (random 2-layer model, byte tokenizer), 4 forecaster
and 2 router/LoRA steps, sparsity 0.4 only (unless --sparsity), held-out sets
of <=256 tokens, rows of 64 tokens, data prepared under RUNS/tfds, report under
RUNS/docs unless --docs is given: the whole pipeline, 11 subprocesses of 5-35 s
each (JAX start-up and compiles), in about 3 minutes on 2 busy cores.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

# The checkout's own ir_jax, also where another checkout is the installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ir_jax.experiments.quality.common import PROG, REPO, rel  # noqa: E402
from ir_jax.experiments.quality.heldout import build_heldout  # noqa: E402
from ir_jax.experiments.quality.options import parser, resolve  # noqa: E402
from ir_jax.experiments.quality.plan import estimate, hms, show, steps  # noqa: E402
from ir_jax.experiments.quality.report import collect, write_report  # noqa: E402
from ir_jax.experiments.quality.run import keep_flops_records, run_all  # noqa: E402
from ir_jax.files import write_json  # noqa: E402


# ------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
  """The command: `heldout ...`, --report-only, --dry-run, or the (resumed) run."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["heldout"]:
    return build_heldout(argv[1:])
  args = parser().parse_args(argv)
  opts = resolve(args)
  command = (
    show(["python", os.path.relpath(__file__, REPO)] + argv)
    if Path(__file__).resolve().is_relative_to(REPO)
    else shlex.join(["python", __file__] + argv)
  )
  if args.report_only:
    path = os.path.join(opts.docs, "results.json")
    if os.path.isfile(os.path.join(opts.runs, "plan.json")):
      write_json(path, keep_flops_records(path, collect(opts.runs)))
    elif not os.path.isfile(path):
      raise SystemExit(f"{PROG}: error: neither {rel(opts.runs)}/plan.json nor {rel(path)}")
    written = write_report(path, opts.docs)
    print(f"{PROG}: wrote " + ", ".join(rel(p) for p in ([path] + written)))
    return 0
  if args.dry_run:
    est = estimate(opts)
    for i, st in enumerate(steps(opts), 1):
      print(f"[{i}] {st.name}{' (complete)' if st.done() else ''}\n    {show(st.argv)}")
    print(
      "expected on a 2-core CPU (SmolLM2-135M rates): "
      + ", ".join(f"{k} {hms(v)}" for k, v in est.items())
    )
    return 0
  return run_all(opts, command)


if __name__ == "__main__":
  sys.exit(main())
