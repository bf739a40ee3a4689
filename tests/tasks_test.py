"""`python -m ir_jax.tasks prepare` on a fake bigbench sdist with one small task.json.

What is checked against what:
  items      the written rows vs prompts and answers spelled out by hand here
  pins       a task.json whose sha256 is not the pinned one is refused, nothing written
  idempotent a second run reads no archive and leaves every file byte-identical
  lm-eval    the written folder loads as an lm-eval task with the items in order
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest

from ir_jax import tasks
from ir_jax.config import ConfigError

FAKE = {
  "name": "fake",
  "examples": [
    {"input": "Is ice cold?", "target_scores": {"yes": 1, "no": 0}},
    {"input": "2 + 2 =", "target_scores": {"3": 0, "4": 1, "5": 0}},
    {"input": "Tie", "target_scores": {"a": 1, "b": 1}},  # no single best: dropped
    {"input": "One", "target_scores": {"a": 1}},  # one choice: dropped
  ],
}
NO_LIST = {
  "name": "nolist",
  "append_choices_to_input": False,
  "task_prefix": "Answer.\n",
  "example_input_prefix": "\nQuestion: ",
  "example_output_prefix": "\nAnswer:",
  "examples": [{"input": "Sky?", "target_scores": {"blue": 1.0, "green": 0.5}}],
}


def _sdist(path, members: dict[str, dict]) -> tuple[str, dict[str, str]]:
  """A tar.gz laid out like the bigbench sdist; returns (path, name -> sha256)."""
  shas = {}
  with tarfile.open(path, "w:gz") as tf:
    for name, task in members.items():
      data = json.dumps(task).encode("utf-8")
      shas[name] = hashlib.sha256(data).hexdigest()
      info = tarfile.TarInfo(f"bigbench-1.0.0/{tasks.MEMBER.format(name)}")
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return str(path), shas


def _rows(out, name: str) -> list[dict]:
  with open(out / f"bigbench_{name}" / "items.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_prepare_writes_rows_spelled_out_by_hand(tmp_path):
  sdist, shas = _sdist(tmp_path / "bb.tar.gz", {"fake": FAKE, "nolist": NO_LIST})
  out = tmp_path / "tasks"
  rec = tasks.prepare(["fake", "nolist"], out, sdist=tasks.Path(sdist), checksums=shas)
  assert _rows(out, "fake") == [
    {"prompt": "Q: Is ice cold?\n  choice: yes\n  choice: no\nA:", "choices": [" yes", " no"],
     "answer": 0},
    {"prompt": "Q: 2 + 2 =\n  choice: 3\n  choice: 4\n  choice: 5\nA:",
     "choices": [" 3", " 4", " 5"], "answer": 1},
  ]  # fmt: skip
  assert _rows(out, "nolist") == [
    {"prompt": "Answer.\n\nQuestion: Sky?\nAnswer:", "choices": ["blue", "green"], "answer": 0}
  ]
  assert rec["fake"]["items"] == 2 and rec["fake"]["dropped"] == 2
  assert rec["fake"]["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
  stored = json.loads((out / tasks.RECORD).read_text())
  assert stored["tasks"]["fake"]["task_json_sha256"] == shas["fake"]


def test_second_run_reads_nothing_and_changes_nothing(tmp_path, capsys):
  sdist, shas = _sdist(tmp_path / "bb.tar.gz", {"fake": FAKE})
  out = tmp_path / "tasks"
  tasks.prepare(["fake"], out, sdist=tasks.Path(sdist), checksums=shas)
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  os.remove(sdist)  # a second run must not need the archive
  tasks.prepare(["fake"], out, sdist=tasks.Path(sdist), checksums=shas)
  assert "present and verified" in capsys.readouterr().out
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_edited_output_is_prepared_again(tmp_path):
  sdist, shas = _sdist(tmp_path / "bb.tar.gz", {"fake": FAKE})
  out = tmp_path / "tasks"
  tasks.prepare(["fake"], out, sdist=tasks.Path(sdist), checksums=shas)
  items = out / "bigbench_fake" / "items.jsonl"
  good = items.read_bytes()
  items.write_text("{}\n")
  tasks.prepare(["fake"], out, sdist=tasks.Path(sdist), checksums=shas)
  assert items.read_bytes() == good


def test_wrong_checksum_and_unknown_task_are_refused(tmp_path):
  sdist, shas = _sdist(tmp_path / "bb.tar.gz", {"fake": FAKE})
  out = tmp_path / "tasks"
  with pytest.raises(ConfigError, match="sha256 .* expected 0+ "):
    tasks.prepare(["fake"], out, sdist=tasks.Path(sdist), checksums={"fake": "0" * 64})
  assert not (out / "bigbench_fake").exists()
  with pytest.raises(ConfigError, match="nope: not a pinned BIG-bench task"):
    tasks.prepare(["nope"], out, sdist=tasks.Path(sdist), checksums=shas)
  (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
  with pytest.raises(ConfigError, match="not the bigbench sdist"):
    tasks.prepare(["fake"], out, sdist=tmp_path / "junk.tar.gz", checksums=shas)
  with pytest.raises(ConfigError, match="no task.json for other"):
    tasks.prepare(["other"], out, sdist=tasks.Path(sdist), checksums={"other": "0" * 64})


def test_written_task_loads_in_lm_eval(tmp_path):
  pytest.importorskip("lm_eval")
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  os.environ["HF_HUB_OFFLINE"] = "1"
  from lm_eval.tasks import TaskManager, get_task_dict

  sdist, shas = _sdist(tmp_path / "bb.tar.gz", {"fake": FAKE})
  out = tmp_path / "tasks"
  tasks.prepare(["fake"], out, sdist=tasks.Path(sdist), checksums=shas)
  task = get_task_dict(
    ["bigbench_fake"], TaskManager(include_path=str(out), include_defaults=False)
  )
  task = task["bigbench_fake"]
  docs = list(task.test_docs())
  assert [task.doc_to_target(d) for d in docs] == [0, 1]
  assert task.doc_to_choice(docs[1]) == [" 3", " 4", " 5"]
  assert task.doc_to_text(docs[0]) == _rows(out, "fake")[0]["prompt"]
