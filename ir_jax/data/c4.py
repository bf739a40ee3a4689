"""C4 as a user can download it -> a prepared dataset the training pipeline reads.

The public C4 release (allenai/c4 on the Hugging Face hub, also mirrored in GCS)
ships English C4 as gzipped JSON lines, one document per line:

    en/c4-train.00000-of-01024.json.gz ... en/c4-validation.00007-of-00008.json.gz
    {"text": "...", "timestamp": "2019-04-25T12:57:54Z", "url": "https://..."}

`python -m ir_jax.data c4 --src GLOB --out DIR` takes such shards (already on disk;
nothing is fetched) and

  1. decompresses each to DIR/jsonl/<shard>.jsonl with the text alone (written under a
     temporary name and renamed; a rerun keeps the shards already converted). A shard
     that is not complete gzip or a line that is not a C4 record is a one-line error
     naming the shard and line;
  2. prepares them as the local text dataset (array_record, documents split into
     train/validation by a hash of their text, data.validation_fraction) under
     DIR/tfds, as `python -m ir_jax.data prepare` does for data.files;
  3. prints the prepared directory: a config reads it with data.name=<that directory>
     (no data.files needed), e.g. on a pod from the gcsfuse-mounted bucket it was
     copied to.

One train shard holds about 356,000 documents (365M over 1,024 shards), roughly
170M Llama-2 tokens; configs/llama7b.py's router stage reads 2,000 x 16 x 2,048 = 66M.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from typing import Callable

from ir_jax.config import refuse_remote
from ir_jax.data.config import LOCAL, DataConfig, DataError, FileSpec

SUFFIX = ".json.gz"
DOMAIN = "c4"


def shards(src: list[str]) -> list[str]:
  """The .json.gz files `src` names (files, directories, globs), sorted, each once."""
  found: list[str] = []
  for s in src:
    s = os.path.expanduser(s)
    if os.path.isdir(s):
      hits = sorted(glob.glob(os.path.join(s, f"*{SUFFIX}")))
    else:
      hits = sorted(glob.glob(s)) if glob.has_magic(s) else ([s] if os.path.isfile(s) else [])
    hits = [h for h in hits if os.path.isfile(h)]
    if not hits:
      raise DataError(
        f"--src {s}: no {SUFFIX} file there; pass C4 shards (e.g. "
        f"'c4/en/c4-train.0000*-of-01024{SUFFIX}') or a directory holding them"
      )
    wrong = [h for h in hits if not h.endswith(SUFFIX)]
    if wrong:
      raise DataError(f"{wrong[0]}: not a {SUFFIX} shard of the C4 release")
    found += [os.path.abspath(h) for h in hits]
  return sorted(set(found))


def convert_shard(src: str, dest: str) -> int:
  """Writes the texts of C4 shard `src` to `dest` as JSON lines {"text"}; the count."""
  tmp = f"{dest}.tmp-{os.getpid()}"
  n, done = 0, False
  try:
    with gzip.open(src, "rb") as fin, open(tmp, "w", encoding="utf-8") as fout:
      for line_no, raw in enumerate(fin, 1):
        if not raw.strip():
          continue
        try:
          rec = json.loads(raw)
        except ValueError:
          rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
          raise DataError(
            f"{src}:{line_no}: not a C4 record (expected a JSON object with a string "
            '"text", as the C4 release has)'
          )
        fout.write(json.dumps({"text": rec["text"]}, ensure_ascii=False) + "\n")
        n += 1
      fout.flush()
      os.fsync(fout.fileno())
    if n == 0:
      raise DataError(f"{src}: no documents in it; is it a C4 shard?")
    os.replace(tmp, dest)
    done = True
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:
    why = str(e) or type(e).__name__
    raise DataError(f"{src}: not a complete gzip file ({why}); download the shard again") from None
  finally:
    if not done and os.path.exists(tmp):
      os.remove(tmp)
  return n


def prepare_c4(
  src: list[str],
  out: str,
  *,
  validation_fraction: float = 0.05,
  say: Callable[[str], None] = print,
) -> str:
  """Converts and prepares the C4 shards `src` under `out` (see the module docstring);
  returns the prepared dataset directory (the value for data.name)."""
  from ir_jax.data.builder import prepare  # tensorflow_datasets: only when preparing

  for s in src:
    refuse_remote("--src", s)
  refuse_remote("--out", out)
  files = shards(src)
  jsonl = os.path.join(os.path.abspath(out), "jsonl")
  os.makedirs(jsonl, exist_ok=True)
  for i, f in enumerate(files, 1):
    dest = os.path.join(jsonl, os.path.basename(f)[: -len(SUFFIX)] + ".jsonl")
    if os.path.exists(dest):
      say(f"[{i}/{len(files)}] {os.path.basename(f)}: already converted")
      continue
    n = convert_shard(f, dest)
    say(f"[{i}/{len(files)}] {os.path.basename(f)}: {n:,} documents")
  names = sorted(os.path.basename(f)[: -len(SUFFIX)] + ".jsonl" for f in files)
  cfg = DataConfig(
    name=LOCAL,
    files=tuple(FileSpec(path=os.path.join(jsonl, n), domain=DOMAIN) for n in names),
    data_dir=os.path.join(os.path.abspath(out), "tfds"),
    validation_fraction=validation_fraction,
  )
  return prepare(cfg, verbose=True)
