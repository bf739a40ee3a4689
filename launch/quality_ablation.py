"""What each part of the quality recipe is worth on SmolLM2-135M, measured in one process.

    python launch/quality_ablation.py [--out docs/ablation] [--sparsity 0.25,0.4]

Fits forecasters (reduced-rank ridge) and warm-starts routers exactly as the
README demo does (`configs/smollm2_135m.py`, the same training batches), then
evaluates held-out perplexity on the demo's validation batches for:
capacity tables (uniform / loss probes / forecast-error curves / error curves
with a FLOPs budget) x choice inside units (informed / random / oracle /
greedy), and informed routing without sink protection. Writes OUT.json and
OUT.md (a table with x-dense ratios and executed-FLOPs fractions). About 12
minutes on 2 quiet CPU cores.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python launch/quality_ablation.py", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("--config", default=os.path.join(REPO, "configs", "smollm2_135m.py"))
  p.add_argument(
    "--out", default=os.path.join(REPO, "docs", "ablation"), help="writes OUT.json and OUT.md"
  )
  p.add_argument("--sparsity", default="0.25,0.4", help="comma-separated target sparsities")
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument(
    "--tables",
    default="uniform,error,error-flops,probe",
    help="capacity tables to evaluate (comma-separated)",
  )
  args = p.parse_args(argv)
  sparsities = [float(v) for v in args.sparsity.split(",") if v.strip()]

  import jax.numpy as jnp
  import numpy as np

  import ir_jax
  from ir_jax import fit
  from ir_jax import routing as R
  from ir_jax.config_file import load_config
  from ir_jax.data import pipeline
  from ir_jax.data.packing import PACK
  from ir_jax.files import write_json
  from ir_jax.provenance import git_commit
  from ir_jax.train.config import settings_from_config

  os.chdir(REPO)
  # The commit the code was loaded from (edits during the run do not change it).
  commit = git_commit(REPO)
  s = settings_from_config(load_config(args.config))
  fc, rc = s.train.forecaster, s.train.router
  t0 = time.time()
  model = ir_jax.load_model(s.model_checkpoint)
  it = pipeline.train_iterator(s.data, prepare_if_missing=True)
  take = lambda n: [{k: np.asarray(v) for k, v in b.items()} for b in itertools.islice(it, n)]
  fit_f, fit_r, alloc = take(fc.fit_batches), take(rc.fit_batches), take(rc.allocation_batches)
  it.close()
  ev_it = pipeline.make_iterator(
    s.data, s.data.eval_split, mode=PACK, shuffle=False, num_epochs=1, num_batches=args.eval_batches
  )
  evals = [{k: jnp.asarray(v) for k, v in b.items()} for b in ev_it]
  ev_it.close()
  fit.set_forecasters(model, fit.forecaster_moments(model, fit_f), fc.ridge)
  fit.set_routers(model, fit.router_moments(model, fit_r), rc.ridge)
  ex = fit.explained(fit.forecast_error(model, evals[:4]))
  print(
    f"fits done in {time.time() - t0:.0f}s; held-out explained attn {ex[:, 0].mean():.3f} "
    f"mlp {ex[:, 1].mean():.3f}",
    flush=True,
  )
  scores, rel = fit.error_curves(model, alloc)
  seq = s.data.seq_len
  probe_dmg = None

  def ppl(spec: R.RoutingSpec) -> float:
    tot = cnt = 0.0
    for b in evals:
      nll, _ = fit.routed_nll(model, b, spec)
      c = float(jnp.sum(b["loss_mask"]))
      tot, cnt = tot + float(nll) * c, cnt + c
    return float(np.exp(tot / cnt))

  dense = ppl(R.RoutingSpec(policy="dense"))
  rows = [
    dict(table="-", policy="dense", sparsity=0.0, perplexity=dense, x_dense=1.0, flops_fraction=1.0)
  ]
  print(f"dense {dense:.3f}", flush=True)

  def add(
    table_name: str, spec: R.RoutingSpec, sparsity: float, policy: str, sinks: bool = True
  ) -> None:
    t = time.time()
    v = ppl(spec)
    fl = R.flops(model.config, spec, seq)["executed_fraction"]
    rows.append(
      dict(
        table=table_name,
        policy=policy + ("" if sinks else " (no sink protection)"),
        sparsity=sparsity,
        perplexity=v,
        x_dense=v / dense,
        flops_fraction=fl,
      )
    )
    print(
      f"{table_name:8s} {rows[-1]['policy']:32s} {sparsity:.2f}: {v:9.3f} ({v / dense:.3f}x) "
      f"FLOPs {fl:.3f}  {time.time() - t:.0f}s",
      flush=True,
    )

  for sp in sparsities:
    tables = {
      "uniform": None,
      "error": fit.allocate_curves(scores, rel, sp),
      "error-flops": fit.allocate_curves(
        scores, rel, sp, unit_cost=R.unit_flops(model.config, seq)
      ),
    }
    if "probe" in args.tables.split(","):
      if probe_dmg is None:
        probe_dmg, _ = fit.unit_damage(model, alloc[:1], rc.probe_level)
      tables["probe"] = fit.allocate(probe_dmg, sp, rc.probe_level)
    for name, table in tables.items():
      if name not in args.tables.split(","):
        continue
      caps = None if table is None else tuple(tuple(map(float, r)) for r in table)
      pols = (
        ("informed", "oracle", "random", "greedy")
        if name in ("uniform", "error")
        else ("informed",)
      )
      for pol in pols:
        add(name, R.RoutingSpec(policy=pol, sparsity=sp, capacities=caps), sp, pol)
      if name == "error":
        add(
          name,
          R.RoutingSpec(policy="informed", capacities=caps, protect_sinks=False),
          sp,
          "informed",
          sinks=False,
        )
  result = {
    "command": "python launch/quality_ablation.py " + " ".join(argv or sys.argv[1:]),
    "commit": commit,
    "eval_tokens": int(sum(float(jnp.sum(b["loss_mask"])) for b in evals)),
    "heldout_explained": {"attn": float(ex[:, 0].mean()), "mlp": float(ex[:, 1].mean())},
    "rows": rows,
  }
  write_json(args.out + ".json", result)
  lines = [
    f"Held-out perplexity on {result['eval_tokens']} tokens of the demo's validation "
    f"split (commit `{commit[:12]}`, `{result['command']}`).",
    "",
    "| table | choice inside units | sparsity | perplexity | x dense | executed FLOPs |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    lines.append(
      f"| {r['table']} | {r['policy']} | {r['sparsity']:g} | {r['perplexity']:.2f} | "
      f"{r['x_dense']:.3f} | {r['flops_fraction']:.3f} |"
    )
  with open(args.out + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {args.out}.json and {args.out}.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
