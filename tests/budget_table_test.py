"""launch/budget_table.py: every trained arm is benchmarked, and the report reads it.

The plan (pure) times each arm's own table with `ir_jax.bench --workdir` after the
arm trains; `speed_for` reads a bench JSON written here by hand into the row of that
arm's own policy only (a random row evaluated on the informed arm routes otherwise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import load_launcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bt():
  return load_launcher("budget_table")


def test_each_arm_is_benchmarked_after_it_trains(tmp_path):
  bt = _bt()
  a = bt.main.__globals__["argparse"].Namespace(
    runs=str(tmp_path), budgets=[0.9], max_tokens=100, probe_batches=1, pair_arm=0.9,
    lora_budget=0.0, lora_steps=0,
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
