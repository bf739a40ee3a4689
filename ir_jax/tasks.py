"""`python -m ir_jax.tasks prepare`: BIG-bench multiple-choice tasks as local lm-eval tasks.

    python -m ir_jax.tasks prepare --tasks social_iqa,winowhy --out runs/tasks
    python -m ir_jax.lm_eval --model ir_jax --model_args pretrained=runs/demo \\
        --tasks bigbench_social_iqa --include_path runs/tasks --batch_size 8

The data comes out of the pinned `bigbench` sdist on the package registry
(`pip download --no-deps`, nothing installed): each chosen task's
`bigbench/benchmark_tasks/NAME/task.json` is checked against a pinned sha256 and
written as `OUT/bigbench_NAME/` (a JSONL of the items, the task YAML and the
`utils.py` that loads it: no hub). A rerun verifies what is there and downloads
nothing. See docs/lm_eval.md.

Items. The prompt is BIG-bench's zero-shot one: the task prefix, the input after
`example_input_prefix` ("Q: "), the choices listed after `choice_prefix` when
`append_choices_to_input` (default true), then `example_output_prefix` ("A:");
each choice is scored as the continuation. The answer is the one choice with the
highest `target_scores` value; an item where several share it, or with fewer than
two choices, is dropped and counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from ir_jax.config import ConfigError
from ir_jax.errors import cli_main

PROG = "ir_jax.tasks"
SDIST = "bigbench==1.0.0"
SDIST_MB = 358
MEMBER = "bigbench/benchmark_tasks/{}/task.json"
RECORD = "prepared.json"
# sha256 of each task.json in the bigbench 1.0.0 sdist (multiple-choice items in brackets).
TASKS: dict[str, str] = {
  "anachronisms": "864b2377906bbd2e6feaa3d0b9b605377529d8a637867b278cd486722b179b55",  # 230
  "hyperbaton": "8cd85fac8281210a1276a82fddd493a27b0484b84ddf65f0b4f9b4476d6233e2",  # 50,000
  "implicatures": "cd3dcb575f3e189ad8a7b5b32364521f569fb4136dea88542d8dc240cd5b3e7d",  # 492
  "navigate": "e076d286bb54c9304de99c24a8d3ddd749be78c12af5d58315195b194c8efa18",  # 1,000
  "social_iqa": "edc9f568b70ae6d4af0783764dbe4e4f18aa1242c675a93f534338d73a565348",  # 1,954
  "sports_understanding": "925617612d19ca02d7b13bfb263300cc13701dca8851151a77be8ce986feadab",
  "strategyqa": "60af9081fed20102fd8bb1e02dc7d9f12238efcba33e4c1a56b4d61cb6409803",  # 2,290
  "timedial": "fccc6b6981fcd3bacdf9a3467e6be9ada9efcd75510175d98b1c8e9269bb5cfb",  # 2,550
  "winowhy": "c36fa38ab146fd7cc60e9f4b7a34c979c5ffbcb4a6870302bf8d785fbe64d1f6",  # 2,865
}
DEFAULT_TASKS = tuple(sorted(TASKS))
# pip 26 refuses this sdist (its metadata declares a direct-URL dependency, bleurt, even
# under --no-deps); this pip, in a throwaway venv, downloads it as pip always did.
FALLBACK_PIP = "pip==24.0"

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

YAML = """# BIG-bench {name} (bigbench 1.0.0 sdist), written by `python -m ir_jax.tasks prepare`.
task: bigbench_{name}
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
  task_json_sha256: "{sha}"
"""


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def items(task: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
  """(lm-eval rows {prompt, choices, answer}, items dropped) of a BIG-bench task.json."""
  in_prefix = task.get("example_input_prefix", "\nQ: ")
  out_prefix = task.get("example_output_prefix", "\nA: ")
  choice_prefix = task.get("choice_prefix", "\n  choice: ")
  append = task.get("append_choices_to_input", True)
  task_prefix = task.get("task_prefix", "")
  rows, dropped = [], 0
  for ex in task.get("examples") or []:
    scores = ex.get("target_scores") if isinstance(ex, dict) else None
    if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(ex.get("input"), str):
      dropped += 1
      continue
    choices = [str(c) for c in scores]
    values = [float(v) for v in scores.values()]
    best = max(values)
    if values.count(best) != 1:
      dropped += 1
      continue
    listed = "".join(choice_prefix + c for c in choices) if append else ""
    prompt = (task_prefix + in_prefix + ex["input"] + listed + out_prefix).lstrip("\n")
    # "A: " ends in a space: it goes with each choice, so a tokenizer sees " word".
    space = " " if prompt.endswith(" ") else ""
    rows.append(
      dict(
        prompt=prompt.rstrip(" ") if space else prompt,
        choices=[space + c for c in choices],
        answer=values.index(best),
      )
    )
  return rows, dropped


def write_task(name: str, task_json: bytes, out: Path, source: str) -> dict[str, Any]:
  """Writes OUT/bigbench_NAME/ (items.jsonl, the YAML, utils.py); returns its record."""
  try:
    task = json.loads(task_json.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise ConfigError(f"{source}: not a JSON task file ({e})") from None
  if not isinstance(task, dict):
    raise ConfigError(f"{source}: not a BIG-bench task (a JSON object with 'examples')")
  rows, dropped = items(task)
  if not rows:
    raise ConfigError(f"{source}: no multiple-choice item (target_scores) in {name}")
  d = out / f"bigbench_{name}"
  d.mkdir(parents=True, exist_ok=True)
  sha = sha256_bytes(task_json)
  files = {
    "items.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
    f"bigbench_{name}.yaml": YAML.format(name=name, source=source, sha=sha),
    "utils.py": UTILS_PY,
  }
  for fname, text in files.items():
    _write_atomic(d / fname, text.encode("utf-8"))
  return dict(
    task=f"bigbench_{name}",
    items=len(rows),
    dropped=dropped,
    chance=sum(1 / len(r["choices"]) for r in rows) / len(rows),
    task_json_sha256=sha,
    files={f: sha256_bytes(t.encode("utf-8")) for f, t in files.items()},
  )


def _write_atomic(path: Path, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def is_prepared(out: Path, name: str, record: dict[str, Any], sha: str) -> bool:
  """The task's folder holds exactly the files its record lists, from the pinned task.json."""
  rec = record.get(name)
  if not isinstance(rec, dict) or rec.get("task_json_sha256") != sha:
    return False
  d = out / f"bigbench_{name}"
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


def task_jsons(archive: Path, names: Iterable[str]) -> dict[str, bytes]:
  """The task.json bytes of `names` from the bigbench sdist (a .tar.gz)."""
  import tarfile

  want = {MEMBER.format(n): n for n in names}
  found: dict[str, bytes] = {}
  try:
    tf = tarfile.open(archive)
  except tarfile.TarError as e:
    raise ConfigError(f"{archive}: not the bigbench sdist (a .tar.gz): {e}") from None
  with tf:
    for m in tf:
      rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
      if m.isfile() and rel in want:
        f = tf.extractfile(m)
        assert f is not None
        found[want[rel]] = f.read()
        if len(found) == len(want):
          break
  missing = sorted(set(want.values()) - set(found))
  if missing:
    raise ConfigError(f"{archive.name} has no task.json for {', '.join(missing)}")
  return found


def _pip_download(python: str, dest: Path) -> Path:
  """`PYTHON -m pip download --no-deps` of the pinned sdist into `dest`; the archive."""
  dest.mkdir(parents=True, exist_ok=True)
  cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
         "--no-binary", ":all:", "-d", str(dest), SDIST]  # fmt: skip
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
    raise RuntimeError(f"pip download of {SDIST} failed (exit {proc.returncode}): {tail}")
  archives = sorted(dest.glob("bigbench-*.tar.gz"))
  if len(archives) != 1:
    raise RuntimeError(f"pip download of {SDIST} left {len(archives)} archives in {dest}")
  return archives[0]


def download_sdist(dest: Path) -> Path:
  """The pinned sdist, downloaded into `dest` (with FALLBACK_PIP when the running pip
  refuses it)."""
  print(f"downloading {SDIST} from the package registry (about {SDIST_MB} MB) ...", flush=True)
  try:
    return _pip_download(sys.executable, dest / "pip")
  except RuntimeError as e:
    if "direct URL" not in str(e):
      raise
  print(f"  this pip refuses it (a direct-URL dependency); again with {FALLBACK_PIP} ...")
  venv = dest / "venv"
  py = str(venv / "bin" / "python")
  for cmd in (
    [sys.executable, "-m", "venv", str(venv)],
    [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", FALLBACK_PIP],
  ):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd[-2:])} failed: {proc.stderr.strip()[-500:]}")
  return _pip_download(py, dest / "pip24")


def prepare(
  names: list[str],
  out: Path,
  *,
  sdist: Path | None = None,
  checksums: dict[str, str] | None = None,
  force: bool = False,
) -> dict[str, Any]:
  """Prepares `names` into `out` (skipping those already there and verified); returns the
  record of every prepared task. `sdist`: a downloaded bigbench archive (default: pip)."""
  pins = TASKS if checksums is None else checksums
  unknown = [n for n in names if n not in pins]
  if unknown:
    raise ConfigError(
      f"--tasks: {', '.join(unknown)}: not a pinned BIG-bench task (pinned, with "
      f"checksums: {', '.join(sorted(pins))})"
    )
  record = read_record(out)
  todo = [n for n in names if force or not is_prepared(out, n, record, pins[n])]
  for n in names:
    if n not in todo:
      print(f"bigbench_{n}: present and verified ({record[n]['items']} items)")
  if todo:
    with tempfile.TemporaryDirectory(prefix="ir_jax_tasks_") as tmp:
      if sdist is None:
        sdist = download_sdist(Path(tmp))
      print(f"reading {len(todo)} task(s) from {sdist.name} ...", flush=True)
      raw = task_jsons(sdist, todo)
    for n in todo:
      got = sha256_bytes(raw[n])
      if got != pins[n]:
        raise ConfigError(
          f"{MEMBER.format(n)}: sha256 {got}, expected {pins[n]} (pinned for {SDIST})"
        )
      record[n] = write_task(n, raw[n], out, f"{SDIST}:{MEMBER.format(n)}")
      r = record[n]
      print(
        f"bigbench_{n}: {r['items']} items ({r['dropped']} dropped: no single best choice), "
        f"chance {r['chance']:.1%}"
      )
    out.mkdir(parents=True, exist_ok=True)
    body = {"source": SDIST, "tasks": dict(sorted(record.items()))}
    _write_atomic(out / RECORD, (json.dumps(body, indent=1) + "\n").encode("utf-8"))
  print(
    f"tasks ready in {out}: --include_path {out} --tasks "
    + ",".join(f"bigbench_{n}" for n in names)
  )
  return {n: record[n] for n in names}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m ir_jax.tasks",
    description="Prepare BIG-bench multiple-choice tasks (from the pinned bigbench sdist on "
    "the package registry, checksummed) as local lm-eval tasks for python -m ir_jax.lm_eval.",
  )
  sub = p.add_subparsers(dest="command", required=True)
  prep = sub.add_parser(
    "prepare",
    help="write OUT/bigbench_NAME/ for each task (idempotent)",
    description="Write each task as OUT/bigbench_NAME/ (items.jsonl, bigbench_NAME.yaml, "
    "utils.py) and OUT/prepared.json (items, dropped, chance, checksums). Tasks already "
    "there and verified are skipped; otherwise the sdist is downloaded once "
    f"(about {SDIST_MB} MB) and each task.json is checked against its pinned sha256.",
  )
  prep.add_argument(
    "--tasks",
    default=",".join(DEFAULT_TASKS),
    help=f"comma-separated BIG-bench task names (default {','.join(DEFAULT_TASKS)}; "
    f"pinned: {', '.join(sorted(TASKS))})",
  )
  prep.add_argument("--out", default="runs/tasks", help="output folder (default runs/tasks)")
  prep.add_argument(
    "--sdist", default=None, help="an already downloaded bigbench-1.0.0.tar.gz (default: pip)"
  )
  prep.add_argument("--force", action="store_true", help="rewrite tasks already prepared")
  args = p.parse_args(argv)
  names = [n.strip() for n in args.tasks.split(",") if n.strip()]
  if not names:
    raise ConfigError("--tasks is empty")
  sdist = Path(args.sdist) if args.sdist else None
  if sdist is not None and not sdist.is_file():
    raise FileNotFoundError(f"--sdist {sdist}: no such file")
  try:
    prepare(names, Path(args.out), sdist=sdist, force=args.force)
  except RuntimeError as e:  # the download failed: pip's last lines say why
    print(f"{PROG}: error: {' / '.join(str(e).splitlines())}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  cli_main(main, PROG)
