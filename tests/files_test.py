"""ir_jax.files.write_json: the bytes json.dumps gives, and a failed write leaves the old file."""

from __future__ import annotations

import json
import os

import pytest

from ir_jax.files import write_json


def test_writes_what_json_dumps_gives_and_creates_the_parent(tmp_path):
  obj = {"b": [1, 2.5, None], "a": "é"}
  path = str(tmp_path / "new" / "x.json")
  assert write_json(path, obj, indent=2) == path
  with open(path, encoding="utf-8") as f:
    assert f.read() == json.dumps(obj, indent=2)
  assert os.listdir(tmp_path / "new") == ["x.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "x.json"
  path.write_text('{"old": true}')
  with pytest.raises(TypeError):
    write_json(str(path), {"bad": object()})
  assert path.read_text() == '{"old": true}' and os.listdir(tmp_path) == ["x.json"]
  write_json(str(path), {"when": object()}, default=lambda o: "obj")
  assert json.loads(path.read_text()) == {"when": "obj"}
