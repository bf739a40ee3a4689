"""ir_jax.provenance on a throwaway git repository and outside one."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from ir_jax.provenance import git_commit, git_info

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(cwd, *args):
  return subprocess.run(
    ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
    cwd=cwd,
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()


def test_commit_and_dirty(tmp_path):
  _git(tmp_path, "init", "-q")
  (tmp_path / "a.txt").write_text("one\n")
  _git(tmp_path, "add", "a.txt")
  _git(tmp_path, "commit", "-q", "-m", "first")
  head = _git(tmp_path, "log", "-1", "--format=%H")
  assert git_info(str(tmp_path)) == {"commit": head, "dirty": False}
  assert git_commit(str(tmp_path), short=True) == head[:12]
  (tmp_path / "untracked.txt").write_text("not tracked\n")
  assert git_info(str(tmp_path))["dirty"] is False  # untracked files do not count
  (tmp_path / "a.txt").write_text("two\n")
  assert git_info(str(tmp_path))["dirty"] is True


def test_outside_a_checkout(tmp_path):
  assert git_info(str(tmp_path)) == {"commit": None, "dirty": None}
  assert git_commit(str(tmp_path)) is None
