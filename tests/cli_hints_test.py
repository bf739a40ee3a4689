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

from ir_jax.data.config import DataConfig, DataError, FileSpec
from ir_jax.eval import __main__ as eval_main
from ir_jax.train import __main__ as train_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_workdir_problems_are_found_without_importing_anything(tmp_path):
  f = tmp_path / "notes.txt"
  f.write_text("x")
  assert train_main.workdir_problem(str(tmp_path / "new" / "run")) is None
  assert train_main.workdir_problem(str(tmp_path)) is None
  assert "exists and is not a directory" in train_main.workdir_problem(str(f))
  under = train_main.workdir_problem(str(f / "run" / "deeper"))
  assert f"{f} is a file, so no directory can be made under it" in under
  assert train_main.workdir_problem("gs://bucket/run") is None  # refused later, by name


def test_train_refuses_a_workdir_under_a_file_in_one_line(tmp_path):
  f = tmp_path / "notes.txt"
  f.write_text("x")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ir_jax.train",
      "--config",
      os.path.join(REPO, "configs", "tiny.py"),
      "--workdir",
      str(f / "run"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
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
    eval_main._local_docs(DataConfig(files=(FileSpec(str(binary)),), tokenizer="byte"), str(binary))
  msg = str(e.value)
  assert "not valid UTF-8" in msg and "iconv" in msg and "--config" in msg
  assert "data.files" not in msg  # a field ir_jax.eval has no flag for
