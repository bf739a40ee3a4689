"""Pictures of what the quality run trained: capacity tables and forecaster explained variance.

    python launch/table_figures.py [--runs runs/quality] [--docs docs]

Reads the informed router arms (RUNS/router_informed_<sparsity>) and the
forecaster arm's held-out explained variance (RUNS/forecaster/forecasters.json)
and writes DOCS/capacity_tables.{json,png} (heat map: layers x {attention, MLP},
one panel per sparsity) and DOCS/explained_variance.png (per layer and unit type).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from ir_jax import plotting
from ir_jax.files import write_json


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python launch/table_figures.py", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("--runs", default="runs/quality", help="the quality run's RUNS directory")
  p.add_argument("--docs", default="docs", help="where the JSON and pictures go")
  args = p.parse_args(argv)
  plt = plotting.pyplot()

  import ir_jax
  from ir_jax.routing import model_table

  arms = sorted(
    glob.glob(os.path.join(args.runs, "router_informed_*")),
    key=lambda d: float(d.rsplit("_", 1)[1]),
  )
  if not arms:
    print(f"table_figures: error: no {args.runs}/router_informed_* workdirs", file=sys.stderr)
    return 2
  tables = {}
  for d in arms:
    table = model_table(ir_jax.load_model(d))
    if table is not None:
      tables[d.rsplit("_", 1)[1]] = [list(r) for r in table]
  os.makedirs(args.docs, exist_ok=True)
  write_json(
    os.path.join(args.docs, "capacity_tables.json"),
    {
      "what": "trained per-unit capacity tables (fraction of tokens executed), "
      "rows = layers, columns = (attention, MLP), by target sparsity",
      "tables": tables,
    },
  )
  fig, axes = plt.subplots(1, len(tables), figsize=(2.2 * len(tables) + 1, 6), squeeze=False)
  for ax, (sp, table) in zip(axes[0], tables.items()):
    t = 1.0 - np.asarray(table)
    im = ax.imshow(t, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks([0, 1], ["attn", "mlp"])
    ax.set_ylabel("layer")
    ax.set_title(f"target {sp}\nattn {t[:, 0].mean():.2f}, mlp {t[:, 1].mean():.2f}", fontsize=9)
  fig.colorbar(im, ax=axes[0].tolist(), label="sparsity (fraction approximated)")
  fig.suptitle("SmolLM2-135M capacity tables (informed routers)")
  plotting.save(fig, os.path.join(args.docs, "capacity_tables.png"), dpi=110, bbox_inches="tight")
  explained = _explained_on_heldout(args.runs)
  write_json(
    os.path.join(args.docs, "capacity_tables.json"),
    {
      "what": "trained per-unit capacity tables (fraction of tokens executed), "
      "rows = layers, columns = (attention, MLP), by target sparsity; and the "
      "forecasters' explained variance per layer on each held-out set "
      "(ordinary tokens: segment starts excluded)",
      "tables": tables,
      "explained": explained,
    },
  )
  if explained:
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for (name, ex), color in zip(explained.items(), ("C0", "C1", "C2")):
      layers = np.arange(len(ex["attn"]))
      ax.plot(layers, ex["attn"], "o-", color=color, label=f"attention, {name}")
      ax.plot(layers, ex["mlp"], "s--", color=color, label=f"MLP, {name}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("explained variance")
    lo = min(min(e["attn"] + e["mlp"]) for e in explained.values())
    ax.set_ylim(max(min(-0.1, lo - 0.05), -1.0), 1.0)
    ax.set_title("Forecasters on held-out ordinary tokens (segment starts excluded)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    plotting.save(
      fig, os.path.join(args.docs, "explained_variance.png"), dpi=110, bbox_inches="tight"
    )
  print(
    f"wrote {args.docs}/capacity_tables.json, capacity_tables.png"
    + (", explained_variance.png" if explained else "")
  )
  return 0


def _explained_on_heldout(runs: str, rows: int = 16) -> dict[str, dict[str, list[float]]]:
  """Explained variance per layer of RUNS/forecaster's forecasters on the first `rows`
  rows of 256 tokens of each held-out set in RUNS/heldout."""
  import numpy as np

  import ir_jax
  from ir_jax import fit
  from ir_jax.data.tokenize import load_text_tokenizer
  from ir_jax.eval.evaluate import Document, pack_documents

  work = os.path.join(runs, "forecaster")
  if not os.path.isdir(work):
    return {}
  model = ir_jax.load_model(work)
  run = json.load(open(os.path.join(work, "run.json")))
  tok = load_text_tokenizer(run["config"]["data"]["tokenizer"], add_bos=None, add_eos=None)
  out = {}
  for path in sorted(glob.glob(os.path.join(runs, "heldout", "*.jsonl"))):
    docs = [json.loads(line) for line in open(path, encoding="utf-8")]
    ids = [
      np.asarray(tok.tokenizer.encode(d["text"], add_special_tokens=False).ids, np.int32)
      for d in docs
    ]
    full, _ = pack_documents([Document("", "", i) for i in ids], 256)
    batches = []
    for start in range(0, min(rows, len(full)), 4):
      r = full.take(slice(start, start + 4), pad_to=4)
      batches.append(
        dict(
          inputs=r.inputs,
          targets=r.targets,
          loss_mask=r.loss_mask,
          positions=r.positions,
          segment_ids=r.segment_ids,
        )
      )
    ex = fit.explained(fit.forecast_error(model, batches))
    out[os.path.basename(path)[: -len(".jsonl")]] = {
      "attn": [round(float(v), 4) for v in ex[:, 0]],
      "mlp": [round(float(v), 4) for v in ex[:, 1]],
    }
  return out


if __name__ == "__main__":
  sys.exit(main())
