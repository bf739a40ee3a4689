"""launch/budget_table.py: every trained arm is benchmarked, and the report reads it.

The plan (pure) times each arm's own table with `ir_jax.bench --workdir` after the
arm trains; `speed_for` reads a bench JSON written here by hand into the row of that
arm's own policy only (a random row evaluated on the informed arm routes otherwise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from conftest import load_launcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bt():
  return load_launcher("budget_table")


def test_each_arm_is_benchmarked_after_it_trains(tmp_path):
  bt = _bt()
  a = bt.main.__globals__["argparse"].Namespace(
    runs=str(tmp_path), budgets=[0.9], max_tokens=100, probe_batches=1, pair_arm=0.9,
    lora_budget=0.0, lora_steps=0, distill_budgets=[], distill_steps=0, distill_lr=1e-4,
    policies=("informed", "static", "greedy"), bench=True,
  )  # fmt: skip
  names = [n for n, _, _ in bt.steps(a)]
  for policy in ("informed", "static", "greedy"):
    i = names.index(f"train {policy} 0.9")
    assert names[i + 1] == f"bench {policy} 0.9"
    done, cmd = [(o, c) for n, o, c in bt.steps(a) if n == f"bench {policy} 0.9"][0]
    assert done == tmp_path / "bench" / f"{policy}_0.9.json"
    assert cmd[1:4] == ["-m", "ir_jax.bench", "--workdir"] and cmd[4] == str(
      tmp_path / f"{policy}_0.9"
    )
    assert cmd[cmd.index("--json") + 1] == str(done)


def test_speed_is_read_for_the_arms_own_policy(tmp_path):
  bt = _bt()
  (tmp_path / "bench").mkdir()
  (tmp_path / "bench" / "informed_0.9.json").write_text(
    json.dumps({"speed": {"prefill_2048": 1.07, "prefill_2048_ideal": 1.12}})
  )
  got = bt.speed_for(Path(tmp_path), "informed_0.9", "informed")
  assert got == {"prefill_speedup_2048": 1.07, "prefill_ideal_2048": 1.12}
  assert bt.speed_for(Path(tmp_path), "informed_0.9", "random") == {}
  assert bt.speed_for(Path(tmp_path), "greedy_0.9", "greedy") == {}


def test_distill_arms_build_on_their_arm_and_route_at_its_budget(tmp_path):
  bt = _bt()
  a = bt.main.__globals__["argparse"].Namespace(
    runs=str(tmp_path), budgets=[0.9, 0.8], max_tokens=100, probe_batches=1, pair_arm=0.9,
    lora_budget=0.0, lora_steps=0, distill_budgets=[0.8], distill_steps=7, distill_lr=3e-4,
    policies=("informed", "static"), bench=False,
  )  # fmt: skip
  plan = bt.steps(a)
  names = [n for n, _, _ in plan]
  assert not any(n.startswith("bench") or "greedy" in n for n in names)
  assert not any("+distill 0.9" in n for n in names)
  for policy in ("informed", "static"):
    i = names.index(f"train {policy}+distill 0.8")
    assert names.index(f"train {policy} 0.8") < i
    cmd = plan[i][2]
    assert f"--config.train.init_from={tmp_path / f'{policy}_0.8'}" in cmd
    assert "--config.train.stages=distill" in cmd and "--config.routing.flops=0.8" in cmd
    assert "--config.train.distill.steps=7" in cmd
    assert "--config.train.distill.learning_rate=0.0003" in cmd
    evals = [n for n in names if n.startswith(f"eval {policy}+distill 0.8 on ")]
    assert evals == [f"eval {policy}+distill 0.8 on {s}" for s in bt.SETS]


def test_tuned_arm_rows_carry_the_stage_in_their_policy(tmp_path):
  bt = _bt()
  rec = {"perplexity": 2.0, "flops_fraction": 0.8, "realized_sparsity": 0.3, "tokens": 10}
  for name in bt.SETS:
    d = tmp_path / "eval" / name
    d.mkdir(parents=True)
    (d / "informed+distill_0.8.json").write_text(
      json.dumps(
        {
          "documents": ["a", "b"],
          "records": [
            dict(rec, policy="dense", perplexity=1.0, flops_fraction=1.0, sparsity=0.0),
            dict(rec, policy="informed", flops_budget=0.8, ratio=2.0, ci_low=1.5, ci_high=2.5),
          ],
        }
      )
    )
  a = bt.main.__globals__["argparse"].Namespace(runs=str(tmp_path), keep_rows=False)
  written = {}
  bt.main.__globals__["write_json"] = lambda path, obj, indent=None: written.setdefault(path, obj)
  bt.main.__globals__["_plot"] = lambda rows_, path: None
  bt.main.__globals__["_markdown"] = lambda *args: None
  bt.report(a)
  rows = written[str(bt.ROOT / "docs" / "results_flops.json")]["rows"]
  got = {(r["eval_set"], r["policy"], r["ratio"]) for r in rows if r["policy"] != "dense"}
  assert got == {(s, "informed+distill", 2.0) for s in bt.SETS}


def test_a_partial_run_keeps_the_rows_it_did_not_rerun(tmp_path):
  bt = _bt()
  row = lambda policy, budget, ratio, commit: {  # noqa: E731
    "policy": policy, "budget_kind": "flops", "budget": budget, "eval_set": "valid",
    "ratio": ratio, "commit": commit,
  }  # fmt: skip
  old = [row("informed", 0.8, 2.0, "a"), row("static", 0.8, 2.8, "a"), row("greedy", 0.9, 1.5, "a")]
  path = tmp_path / "results_flops.json"
  path.write_text(json.dumps({"rows": old}))
  new = [row("informed", 0.8, 1.9, "b"), row("informed+distill", 0.8, 1.7, "b")]
  assert bt.kept_rows(path, new) == [old[1], old[2]]
  assert bt.kept_rows(tmp_path / "missing.json", new) == []


def test_a_tuned_arm_is_paired_with_its_base_on_the_same_documents(tmp_path):
  bt = _bt()
  docs = [{"source": f"d{i}", "tokens": n} for i, n in enumerate((10, 20, 30))]
  base_nll, tuned_nll = [20.0, 50.0, 60.0], [18.0, 41.0, 60.0]
  for name in bt.SETS:
    d = tmp_path / "eval" / name
    d.mkdir(parents=True)
    for arm, nll in (("informed_0.8", base_nll), ("informed+distill_0.8", tuned_nll)):
      recs = [
        {"policy": "dense", "doc_nll": [1.0, 1.0, 1.0]},
        {"policy": "informed", "sparsity": 0.25, "doc_nll": [9.0, 9.0, 9.0]},  # a pairs row
        {"policy": "informed", "flops_budget": 0.8, "doc_nll": nll},
      ]
      (d / f"{arm}.json").write_text(json.dumps({"documents": docs, "records": recs}))
  got = bt.paired_rows(tmp_path)
  assert [(p["eval_set"], p["tuned"], p["base"], p["budget"]) for p in got] == [
    (s, "informed+distill", "informed", 0.8) for s in bt.SETS
  ]
  # by hand: exp((119 - 130) / 60)
  np.testing.assert_allclose(got[0]["ratio"], np.exp(-11 / 60), rtol=1e-12)
  assert got[0]["ci_low"] <= got[0]["ratio"] <= got[0]["ci_high"] and got[0]["documents"] == 3
