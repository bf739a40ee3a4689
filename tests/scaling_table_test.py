"""launch/scaling_table.py --update-doc: fresh records replace matching rows, † dropped."""

from __future__ import annotations

import os

from conftest import load_launcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
  return load_launcher("scaling_table")


def _record(stage: str, total: float, per_host_batch: int = 4) -> dict:
  return {
    "config": "configs/llama7b.py",
    "stage": stage,
    "topology": "v5e:4x4",
    "chips": 16,
    "mesh": {"data": 1, "fsdp": 16, "tensor": 1},
    "per_host_batch": per_host_batch,
    "seq_len": 2048,
    "fits": True,
    "total_gib": total,
    "argument_gib": 0.8,
    "temp_gib": total - 0.8,
    "step_s": 0.78,
    "tokens_per_s": 41942.0,
  }


def test_update_doc_replaces_only_rows_with_fresh_records():
  mod = _module()
  old_router = (
    "| llama7b.py | router † | v5e:4x4 (16) | 1x16x1 | 4 x 2048 | yes | 6.46 (0.80 + 5.62) "
    "| 0.78 | 41,942 |\n"
  )
  old_lora = (
    "| llama7b.py | lora † | v5e:4x4 (16) | 1x16x1 | 4 x 2048 | yes | 6.32 (0.85 + 5.39) "
    "| 0.52 | 62,627 |\n"
  )
  text = "intro\n\n| config | stage |\n| --- | --- |\n" + old_router + old_lora + "\nafter\n"
  # A record for the router row, and one for a different per-host batch (no row of its own).
  new, n = mod.update_doc(text, [_record("router", 3.14), _record("infer", 1.4, 16)])
  assert n == 1
  lines = new.splitlines(keepends=True)
  router = [line for line in lines if "| router" in line]
  assert router == [
    "| llama7b.py | router | v5e:4x4 (16) | 1x16x1 | 4 x 2048 | yes | 3.14 (0.80 + 2.34) "
    "| 0.78 | 41,942 |\n"
  ]
  assert old_lora in lines and "intro\n" in lines and "after\n" in lines
  assert len(lines) == len(text.splitlines())
