"""Errors a user meets first, in the running command's own terms.

What is checked against what:
  workdir    `python -m ir_jax.train --workdir` under a file, or naming a file: exit 2,
             one stderr line naming the file, no traceback, nothing created
  encoding   ir_jax.eval on a --data file that is not UTF-8 (binary bytes): the hint names
             what ir_jax.eval accepts (convert the file, or --config), not data.files
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import train_cli

from ir_jax.data.config import DataConfig, DataError, FileSpec
from ir_jax.eval import documents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workdir_problems(paths: list[str]) -> list[str | None]:
  # In a child process: ir_jax.train.__main__ defines absl flags (--config, ...) that
  # other CLIs imported by this test session (ir_jax.aot) define too.
  import json

  code = (
    "import json, sys; from ir_jax.train.__main__ import workdir_problem; "
    "print(json.dumps([workdir_problem(p) for p in json.loads(sys.argv[1])]))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code, json.dumps(paths)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_workdir_problems_are_found_without_importing_anything(tmp_path):
  f = tmp_path / "notes.txt"
  f.write_text("x")
  new, here, file, under, bucket = _workdir_problems(
    [str(tmp_path / "new" / "run"), str(tmp_path), str(f), str(f / "run" / "deeper"), "gs://b/r"]
  )
  assert new is None and here is None
  assert "exists and is not a directory" in file
  assert f"{f} is a file, so no directory can be made under it" in under
  assert bucket is None  # refused later, by name


def test_train_refuses_a_workdir_under_a_file_in_one_line(tmp_path):
  f = tmp_path / "notes.txt"
  f.write_text("x")
  proc = train_cli(str(f / "run"))
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines == [
    f"ir_jax.train: error: --workdir {f / 'run'}: {f} is a file, so no directory can be "
    "made under it; choose a workdir under a directory"
  ]
  assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_eval_encoding_hint_names_what_eval_accepts(tmp_path):
  binary = tmp_path / "tool.txt"
  binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe\x80 some text\n")
  with pytest.raises(DataError) as e:
    documents.local_docs(DataConfig(files=(FileSpec(str(binary)),), tokenizer="byte"), str(binary))
  msg = str(e.value)
  assert "not valid UTF-8" in msg and "iconv" in msg and "--config" in msg
  assert "data.files" not in msg  # a field ir_jax.eval has no flag for
