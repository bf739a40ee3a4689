"""Kill training at random moments, restart it, and check nothing was lost.

    python launch/fault_injection.py --kills 30 --json docs/fault_injection.json
    python launch/fault_injection.py --kills 2 --quick      # what tests/ runs

1. A reference: `python -m ir_jax.train --config configs/tiny.py` (forecaster and
   router stages, asynchronous checkpoints after every step so that kills often
   land during a write) run once without interruption.
2. The campaign: the same command in another workdir, killed with SIGKILL and
   restarted with the same command, --kills times, then left to finish. The
   moment of a kill: one time in five during start-up (import, restore,
   compile: 0.5-6 s after launch), otherwise 0-0.6 s after a random training
   step still to do was logged, which with a checkpoint after every step often
   lands during an asynchronous write. Before every restart the newest
   committed step of each stage is read from disk (orbax's step directories;
   unfinished writes are `*.orbax-checkpoint-tmp-*`), and the restarted run
   must say it resumed from exactly that step (or that the stage had finished).
   A run that reaches the end before its kill is compared and the campaign
   starts over in a fresh directory.
3. The final adapters and optimizer state of both stages must be bit-identical
   to the reference's.

Prints one line per kill and a summary; --json writes every kill (when, what was
on disk, whether a checkpoint write was in flight, where the restart resumed).
Exit 1 if any check failed.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ir_jax.files import write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEWS = os.path.join(REPO, "assets", "text", "news", "lee.cor")
STAGES = ("forecaster", "router")


def command(workdir: str, data_dir: str, steps: int) -> list[str]:
  return [
    sys.executable,
    "-u",
    "-m",
    "ir_jax.train",
    "--config",
    os.path.join(REPO, "configs", "tiny.py"),
    "--workdir",
    workdir,
    f"--config.data.data_dir={data_dir}",
    f"--config.data.files=('{NEWS}',)",
    "--config.train.stages=forecaster,router",
    f"--config.train.forecaster.steps={steps}",
    f"--config.train.router.steps={steps}",
    "--config.train.checkpoint_every=1",
    "--config.train.keep_checkpoints=2",
    "--config.train.async_checkpoints=True",
    "--config.train.eval_batches=0",
    "--config.train.log_every=1",
    "--config.mesh.data=-1",
  ]


def env() -> dict[str, str]:
  e = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
  e.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  return e


def on_disk(workdir: str) -> dict[str, dict]:
  """Per stage: newest committed step (None if none) and unfinished writes."""
  out = {}
  for st in STAGES:
    d = os.path.join(workdir, "checkpoints", st)
    names = os.listdir(d) if os.path.isdir(d) else []
    steps = [int(n) for n in names if n.isdigit()]
    out[st] = {
      "newest": max(steps) if steps else None,
      "in_flight": sorted(n for n in names if "tmp" in n),
    }
  return out


def final_items(workdir: str, steps: int) -> dict[str, object]:
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  out = {}
  for st in STAGES:
    for item in ("adapters", "opt_state"):
      tree = ocp.PyTreeCheckpointer().restore(
        os.path.join(workdir, "checkpoints", st, str(steps), item)
      )
      for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[f"{st}/{item}{jax.tree_util.keystr(p)}"] = np.asarray(v)
  return out


def _progress(workdir: str) -> int:
  """Batches done over both stages, by the newest committed steps."""
  d = on_disk(workdir)
  return sum(d[st]["newest"] or 0 for st in STAGES)


def campaign(kills: int, steps: int, seed: int, root: str, log=print) -> dict:
  rng = random.Random(seed)
  data_dir = os.path.join(root, "tfds")
  ref, work = os.path.join(root, "reference"), os.path.join(root, "killed")
  t0 = time.time()
  r = subprocess.run(
    command(ref, data_dir, steps), cwd=REPO, env=env(), capture_output=True, text=True, check=False
  )
  if r.returncode:
    raise SystemExit(f"fault_injection: the reference run failed:\n{r.stderr[-3000:]}")
  log(f"reference run: {time.time() - t0:.1f}s for {steps} + {steps} steps")
  events, bad = [], []
  n = 0
  while True:
    before = on_disk(work)
    p = subprocess.Popen(
      command(work, data_dir, steps),
      cwd=REPO,
      env=env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    lines: list[str] = []
    killed, how = False, None
    if n < kills:
      # The moment: one time in five during start-up (import, restore, compile), else
      # a random fraction of a step after a random training step still to do was
      # logged; with a checkpoint after every step, many kills land during a write.
      done_batches = _progress(work)
      if rng.random() < 0.2 or done_batches >= 2 * steps - 1:
        how = ("startup", round(rng.uniform(0.5, 6.0), 2))
      else:
        k = rng.randint(done_batches + 1, 2 * steps - 1)
        st, i = ("forecaster", k) if k <= steps else ("router", k - steps)
        how = (f"[{st} {i}/{steps}]", round(rng.uniform(0.0, 0.6), 2))
      t_start = time.time()
      for line in p.stdout:
        lines.append(line)
        if how[0] == "startup" and time.time() - t_start >= how[1]:
          break
        if how[0] != "startup" and line.startswith(how[0][:-1]):
          time.sleep(how[1])
          break
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        killed = True
    rest, _ = p.communicate()
    out = "".join(lines) + (rest or "")
    # Where did this run resume? It must be the newest committed step on disk.
    for st in STAGES:
      want = before[st]["newest"]
      m = re.search(rf"\[{st}\] resumed from batch (\d+)", out)
      fin = re.search(rf"\[{st}\] already finished \((\d+) batches\)", out)
      got = int(m.group(1)) if m else (int(fin.group(1)) if fin else None)
      started = re.search(rf"\[{st}\] training ", out) or fin
      if started and got != want:
        bad.append(f"run {n}: {st} resumed from {got}, the newest committed step was {want}")
    if not killed:
      if p.returncode:
        bad.append(f"run {n} (not killed) failed with exit {p.returncode}: {out[-800:]}")
        break
      if n >= kills:
        break
      log("  (the run finished before its kill; compared, starting over in a fresh directory)")
      _compare(final_items(ref, steps), final_items(work, steps), bad)
      shutil.rmtree(work)
      continue
    after = on_disk(work)
    ev = {
      "kill": n + 1,
      "moment": how[0],
      "delay_s": how[1],
      "newest_before": {st: before[st]["newest"] for st in STAGES},
      "newest_after": {st: after[st]["newest"] for st in STAGES},
      # an unfinished write left by this kill (not one left over from an earlier kill)
      "write_in_flight": any(
        set(after[st]["in_flight"]) - set(before[st]["in_flight"]) for st in STAGES
      ),
    }
    events.append(ev)
    n += 1
    log(
      f"kill {n}/{kills} at {how[0]} + {how[1]}s: newest committed {ev['newest_after']}"
      + ("; a checkpoint write was in flight" if ev["write_in_flight"] else "")
    )
    if _progress(work) >= 2 * steps and n < kills:
      log("  (the run had finished; starting the campaign over in a fresh directory)")
      a, b = final_items(ref, steps), final_items(work, steps)
      _compare(a, b, bad)
      shutil.rmtree(work)
  a, b = final_items(ref, steps), final_items(work, steps)
  _compare(a, b, bad)
  summary = {
    "kills": len(events),
    "kills_during_write": sum(e["write_in_flight"] for e in events),
    "survived": not bad,
    "failures": bad,
    "steps_per_stage": steps,
    "seed": seed,
    "events": events,
    "total_wall_s": round(time.time() - t0, 1),
  }
  log(
    f"{summary['kills']} kills ({summary['kills_during_write']} with a checkpoint write in "
    "flight); "
    + (
      "every restart resumed from the newest committed step and the final state "
      "is bit-identical to the uninterrupted run"
      if not bad
      else "FAILED: " + "; ".join(bad)
    )
  )
  return summary


def _compare(a: dict, b: dict, bad: list[str]) -> None:
  import numpy as np

  if a.keys() != b.keys():
    bad.append(f"final checkpoints differ in structure: {sorted(set(a) ^ set(b))[:4]}")
    return
  diff = [k for k in a if not np.array_equal(a[k], b[k])]
  if diff:
    bad.append(f"{len(diff)} of {len(a)} final arrays differ from the reference, e.g. {diff[0]}")


def main() -> int:
  # The final checkpoints are read here, on as many CPU devices as the runs used.
  os.environ.update(env())
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[2:]),
  )
  p.add_argument("--kills", type=int, default=20)
  p.add_argument("--steps", type=int, default=12, help="steps per stage (default 12)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--root", default=None, help="working directory (default: a temporary one)")
  p.add_argument("--json", default=None)
  p.add_argument("--quick", action="store_true", help="6 steps per stage")
  args = p.parse_args()
  if not os.path.exists(NEWS):
    raise SystemExit("fault_injection: demo assets missing: run `bash launch/fetch_assets.sh`")
  root = args.root or tempfile.mkdtemp(prefix="ir_jax_faults_")
  summary = campaign(args.kills, 6 if args.quick else args.steps, args.seed, root)
  if args.json:
    write_json(args.json, summary)
  if not args.root:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if summary["survived"] else 1


if __name__ == "__main__":
  sys.exit(main())
