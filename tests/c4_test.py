"""`python -m ir_jax.data c4`: C4 release shards (gzipped JSON lines {"text", "timestamp",
"url"}) -> a prepared dataset that data.name points at.

What is checked against what: two fake shards made here in the release's format; the
prepared train and validation splits together hold exactly the texts written (as a
multiset, whitespace-stripped as every document is), with domain 'c4'; the training
pipeline reads a batch from the directory printed for data.name and its first row
decodes to the start of one of those texts; broken shards (truncated gzip, a line that
is not a C4 record) are one-line errors naming the file (and line) with nothing left
half-written; a rerun converts nothing again.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ir_jax.data.__main__ import main
from ir_jax.data.builder import open_split
from ir_jax.data.config import DataConfig, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(n: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  words = ["pod", "shard", "router", "forecast", "bucket", "token", "layer", "C4", "été", "ß"]
  return [
    " ".join(rng.choice(words, size=int(rng.integers(5, 60)))) + f" ({seed}.{i})" for i in range(n)
  ]


def _shard(path, texts: list[str]) -> None:
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for i, t in enumerate(texts):
      rec = {"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"}
      f.write(json.dumps(rec) + "\n")


def _run(argv: list[str]) -> str:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert main(argv) == 0
  return out.getvalue()


def test_c4_shards_become_a_prepared_dataset_the_pipeline_reads(tmp_path):
  src = tmp_path / "c4" / "en"
  src.mkdir(parents=True)
  a, b = _texts(60, 0), _texts(25, 1)
  _shard(src / "c4-train.00000-of-01024.json.gz", a)
  _shard(src / "c4-train.00001-of-01024.json.gz", ["  padded both sides  "] + b)
  out = tmp_path / "out"
  log = _run(["c4", "--src", str(src / "c4-train.*.json.gz"), "--out", str(out)])
  assert "[1/2] c4-train.00000-of-01024.json.gz: 60 documents" in log
  assert "[2/2] c4-train.00001-of-01024.json.gz: 26 documents" in log
  path = log.split("--config.data.name=")[1].split()[0]
  assert os.path.isfile(os.path.join(path, "dataset_info.json"))

  cfg = DataConfig(name=path, tokenizer="byte", seq_len=64, batch_size=2)
  got = []
  for split in ("train", "validation"):
    source = open_split(cfg, split)
    got += [source.document(i) for i in range(len(source))]
  want = a + ["padded both sides"] + b
  assert collections.Counter(t for t, _ in got) == collections.Counter(want)
  assert {d for _, d in got} == {"c4"}
  assert len(open_split(cfg, "validation")) > 0

  from ir_jax.data.pipeline import make_iterator
  from ir_jax.data.tokenize import load_text_tokenizer

  tok = load_text_tokenizer("byte", None, None)
  it = make_iterator(cfg, "train", tokenizer=tok, process_index=0, process_count=1)
  batch = it.next_local()
  it.close()
  assert batch["inputs"].shape == (2, 64)
  row = batch["inputs"][0][batch["segment_ids"][0] == 1]
  start = tok.decode(row[:20]).lstrip()
  assert start and any(t.startswith(start[:10]) for t in want), start

  # A rerun converts nothing and names the same dataset.
  again = _run(["c4", "--src", str(src), "--out", str(out)])
  assert "c4-train.00000-of-01024.json.gz: already converted" in again
  assert again.split("--config.data.name=")[1].split()[0] == path


def test_broken_shards_are_one_line_errors(tmp_path):
  from ir_jax.data.c4 import prepare_c4

  good = tmp_path / "c4-train.00000-of-01024.json.gz"
  _shard(good, _texts(30, 2))
  truncated = tmp_path / "t" / "c4-train.00001-of-01024.json.gz"
  truncated.parent.mkdir()
  truncated.write_bytes(good.read_bytes()[:-40])
  with pytest.raises(DataError, match=r"c4-train.00001-of-01024.json.gz: not a complete gzip"):
    prepare_c4([str(truncated)], str(tmp_path / "o1"), say=lambda s: None)
  assert os.listdir(tmp_path / "o1" / "jsonl") == []  # nothing half-written

  other = tmp_path / "x" / "c4-train.00002-of-01024.json.gz"
  other.parent.mkdir()
  with gzip.open(other, "wt", encoding="utf-8") as f:
    f.write(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "not c4"}) + "\n")
  with pytest.raises(DataError) as e:
    prepare_c4([str(other)], str(tmp_path / "o2"), say=lambda s: None)
  assert str(e.value) == (
    f'{other}:2: not a C4 record (expected a JSON object with a string "text", as the C4 '
    "release has)"
  )
  assert os.listdir(tmp_path / "o2" / "jsonl") == []


@pytest.mark.slow  # a fresh interpreter (jax import)
def test_cli_without_shards_is_one_line(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "ir_jax.data", "c4", "--src", str(tmp_path / "none"), "--out", "o"],
    cwd=str(tmp_path),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert out.returncode == 2, out.stderr
  assert out.stderr.startswith(f"python -m ir_jax.data: error: --src {tmp_path / 'none'}: no ")
  assert len(out.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "o")


def test_bucket_paths_are_refused(tmp_path):
  from ir_jax.config import ConfigError
  from ir_jax.data.c4 import prepare_c4

  with pytest.raises(ConfigError, match="--out gs://b/c4: URL paths are not read directly"):
    prepare_c4([str(tmp_path)], "gs://b/c4")
  with pytest.raises(ConfigError, match="--src gs://b/en/x.json.gz: URL paths"):
    prepare_c4(["gs://b/en/x.json.gz"], str(tmp_path / "o"))
  assert os.listdir(tmp_path) == []
