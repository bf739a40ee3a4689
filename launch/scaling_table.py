"""Regenerates the docs/scaling.md table: `python -m ir_jax.aot` for the 7B/8B configs.

    python launch/scaling_table.py                    # compile every missing row (~1 h)
    python launch/scaling_table.py --report           # print the markdown table only
    python launch/scaling_table.py --only llama7b.py:v4:2x2x2
    python launch/scaling_table.py --update-doc docs/scaling.md   # fold fresh rows in

Needs libtpu (pip install 'ir_jax[tpu]'). Every (config, topology, mesh) job is
one `python -m ir_jax.aot` process compiling the four stages one after another;
its records are appended to --jsonl (default docs/scaling_aot.jsonl), and a job
whose stages are all there is skipped, so a killed run continues where it
stopped. A job that fails prints its last error line and the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("forecaster", "router", "lora", "infer")
CONFIGS = ("configs/llama7b.py", "configs/llama3_8b.py")
# topology -> config overrides that keep 4 rows of 2,048 tokens (and the forecaster's
# reference 16 x 128 budget, 64 x 128 on 64 chips) per host of 4 chips.
TOPOLOGIES = {
  "v5e:4x4": [],
  "v5e:8x8": ["--config.data.batch_size=64", "--config.train.forecaster.batch_size=64"],
  "v5p:2x2x2": ["--config.data.batch_size=8"],
  "v4:2x2x2": ["--config.data.batch_size=8"],
  # The smallest slice a 7B routed model trains on: one host of 4 chips.
  "v5e:2x2": ["--config.data.batch_size=4"],
}
# Extra rows: tensor parallelism 2 on the smallest v5e slice (fsdp 8 x tensor 2).
EXTRA = [("configs/llama3_8b.py", "v5e:4x4", ["--config.mesh.tensor=2"], ("router",))]


def jobs() -> list[tuple[str, str, list[str], tuple[str, ...]]]:
  out = [(c, t, o, STAGES) for c in CONFIGS for t, o in TOPOLOGIES.items()]
  return out + EXTRA


def _key(config: str, topology: str, mesh: dict, stage: str) -> tuple:
  return (os.path.basename(config), topology, "x".join(str(v) for v in mesh.values()), stage)


def load(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _mesh_of(overrides: list[str]) -> str | None:
  return "tensor=2" if "--config.mesh.tensor=2" in overrides else None


def done(records: list[dict], config: str, topology: str, overrides: list[str], stage: str) -> bool:
  tensor = 2 if _mesh_of(overrides) else 1
  return any(
    os.path.basename(r["config"]) == os.path.basename(config)
    and r["topology"] == topology
    and r["stage"] == stage
    and r["mesh"].get("tensor", 1) == tensor
    for r in records
  )


def report(records: list[dict]) -> str:
  from ir_jax.aot import markdown_row

  latest = {}
  for r in records:  # the last record of a row wins (a recompile replaces it)
    latest[_key(r["config"], r["topology"], r["mesh"], r["stage"])] = r
  order = {t: i for i, t in enumerate(TOPOLOGIES)}
  rows = sorted(
    latest.values(),
    key=lambda r: (
      os.path.basename(r["config"]),
      order.get(r["topology"], 99),
      r["mesh"].get("tensor", 1),
      STAGES.index(r["stage"]) if r["stage"] in STAGES else 9,
    ),
  )
  head = (
    "| config | stage | topology (chips) | mesh d x f x t | per-host batch | fits | "
    "per-chip GiB: total (args + temps) | step s | tokens/s |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  )
  lines = []
  for r in rows:
    line = markdown_row(r, os.path.basename(r["config"]))
    line = line.replace(f"| {r['topology']} |", f"| {r['topology']} ({r['chips']}) |", 1)
    lines.append(line)
  return head + "\n" + "\n".join(lines)


def _row_key(line: str) -> tuple[str, ...]:
  """(config, stage, topology, mesh, per-host batch) of a table row; a † mark is ignored."""
  cells = [c.strip() for c in line.strip().strip("|").split("|")]
  return (cells[0], cells[1].replace("†", "").strip(), *cells[2:5])


def update_doc(text: str, records: list[dict]) -> tuple[str, int]:
  """`text` with every row of its table that has a fresh record replaced by that record's
  row (which carries no † mark); (new text, rows replaced). Rows without a record stay."""
  fresh = {_row_key(line): line for line in report(records).splitlines()[2:]}
  out, replaced = [], 0
  for line in text.splitlines(keepends=True):
    if line.startswith("| llama") and _row_key(line) in fresh:
      new = fresh[_row_key(line)] + "\n"
      replaced += new != line
      out.append(new)
    else:
      out.append(line)
  return "".join(out), replaced


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[2:]),
  )
  p.add_argument("--jsonl", default=os.path.join(REPO, "docs", "scaling_aot.jsonl"))
  p.add_argument("--report", action="store_true", help="print the table from --jsonl only")
  p.add_argument(
    "--update-doc",
    metavar="MD",
    default=None,
    help="replace the rows of MD's table (e.g. docs/scaling.md) that --jsonl has fresh "
    "records for, dropping their † marks; nothing is compiled",
  )
  p.add_argument(
    "--only",
    action="append",
    default=[],
    help="CONFIG_FILE_NAME:TOPOLOGY, e.g. llama7b.py:v4:2x2x2 (repeatable)",
  )
  args = p.parse_args()
  if args.report:
    print(report(load(args.jsonl)))
    return 0
  if args.update_doc:
    with open(args.update_doc, encoding="utf-8") as f:
      text, n = update_doc(f.read(), load(args.jsonl))
    with open(args.update_doc, "w", encoding="utf-8") as f:
      f.write(text)
    print(f"{args.update_doc}: {n} row(s) replaced by fresh records")
    return 0
  failed = 0
  for config, topology, overrides, stages in jobs():
    name = f"{os.path.basename(config)}:{topology}"
    if args.only and name not in args.only:
      continue
    records = load(args.jsonl)
    todo = [s for s in stages if not done(records, config, topology, overrides, s)]
    if not todo:
      print(f"{name} {' '.join(overrides)}: done", flush=True)
      continue
    cmd = [
      sys.executable,
      "-m",
      "ir_jax.aot",
      "--config",
      config,
      "--topology",
      topology,
      "--stage",
      ",".join(todo),
      "--json",
      args.jsonl,
      *overrides,
    ]
    print(f"{name} {' '.join(overrides)}: compiling {','.join(todo)} ...", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    lines = [l for l in (r.stderr or "").splitlines() if l.strip()]
    if r.returncode not in (0, 1):  # 1: a stage does not fit (a result, recorded)
      failed += 1
      print(f"  failed (exit {r.returncode}): {lines[-1] if lines else ''}", flush=True)
    else:
      print(f"  done in {time.time() - t0:.0f}s", flush=True)
  print(report(load(args.jsonl)))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
