"""Interrupt anywhere, rerun, same result: data preparation, import, export and evaluation
killed (SIGKILL) or interrupted (SIGINT) at a point inside their work, then the same command
again, end with the files an uninterrupted run writes. Training stages are covered by
fault_injection_test.py and reliability_test.py."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # several interpreters per phase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "tests", "data", "eval", "docs.jsonl")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def run(*args: str) -> subprocess.CompletedProcess:
  p = subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
  )
  assert p.returncode == 0, p.stdout + p.stderr
  return p


def interrupt_at(marker: str, sig: int, *args: str) -> None:
  """Runs the command and sends `sig` as soon as it prints a line containing `marker`."""
  p = subprocess.Popen(
    [sys.executable, "-m", *args],
    cwd=REPO,
    env=ENV,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  seen = []
  for line in p.stdout:
    seen.append(line)
    if marker in line:
      p.send_signal(sig)
      break
  p.stdout.read()
  p.wait(timeout=300)
  assert any(marker in s for s in seen), "".join(seen)  # it really was stopped there
  assert p.returncode != 0 or sig == signal.SIGINT, "".join(seen)


def files(root: str) -> dict[str, bytes]:
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      path = os.path.join(d, n)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_data_prepare(tmp_path, sig):
  conf = ["--config", "configs/tiny.py"]
  interrupt_at(
    "scanning", sig, "ir_jax.data", "prepare", *conf, f"--config.data.data_dir={tmp_path / 'a'}"
  )
  run("ir_jax.data", "prepare", *conf, f"--config.data.data_dir={tmp_path / 'a'}")
  run("ir_jax.data", "prepare", *conf, f"--config.data.data_dir={tmp_path / 'b'}")
  assert sorted(files(str(tmp_path / "a"))) == sorted(files(str(tmp_path / "b")))
  # array_record files carry a per-write header, so the records are compared as read.
  import dataclasses

  from ir_jax.data.builder import open_split
  from ir_jax.data.config import from_config

  dcfg = from_config(runpy.run_path(os.path.join(REPO, "configs", "tiny.py"))["get_config"]())
  for split in ("train", "validation"):
    a, b = (open_split(dataclasses.replace(dcfg, data_dir=str(tmp_path / x)), split) for x in "ab")
    assert len(a) == len(b) > 0
    assert [a.document(i) for i in range(len(a))] == [b.document(i) for i in range(len(b))]


def _params(ckpt: str) -> dict:
  import jax
  from flax import nnx

  import ir_jax

  state = nnx.to_pure_dict(nnx.state(ir_jax.load_model(ckpt)))
  return {
    jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)
  }


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_import_then_export(tiny_hf_dirs, tmp_path, sig):
  src = tiny_hf_dirs["gqa_llama3_untied"]
  imp = ("ir_jax.convert", "import", "--format", "hf", src, "--out")
  interrupt_at("writing", sig, *imp, str(tmp_path / "a"))
  run(*imp, str(tmp_path / "a"))
  run(*imp, str(tmp_path / "b"))
  assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no temporary directory left behind
  # orbax names its files by random hashes: the parameters are compared as loaded.
  fa, fb = (
    {k: v for k, v in files(str(tmp_path / x)).items() if not k.startswith("params")} for x in "ab"
  )
  assert "ir_jax.json" in fa and fa == fb
  pa, pb = _params(str(tmp_path / "a")), _params(str(tmp_path / "b"))
  assert sorted(pa) == sorted(pb) and all(np.array_equal(pa[k], pb[k]) for k in pa)

  exp = ("ir_jax.convert", "export", str(tmp_path / "a"), "--out")
  interrupt_at("wrote model.safetensors", sig, *exp, str(tmp_path / "ea"))
  run(*exp, str(tmp_path / "ea"))
  run(*exp, str(tmp_path / "eb"))
  assert sorted(os.listdir(tmp_path)) == ["a", "b", "ea", "eb"]
  assert files(str(tmp_path / "ea")) == files(str(tmp_path / "eb"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_eval(tmp_path, sig):
  import jax
  from flax import nnx

  from ir_jax import checkpoint
  from ir_jax.config import from_config_dict
  from ir_jax.data.tokenize import byte_tokenizer
  from ir_jax.model import init_model

  (tmp_path / "tok").mkdir()
  byte_tokenizer().save(str(tmp_path / "tok" / "tokenizer.json"))
  cfg = from_config_dict(
    runpy.run_path(os.path.join(REPO, "configs", "tiny.py"))["get_config"]().model
  )
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(init_model(cfg, seed=3))))
  ckpt = checkpoint.save(str(tmp_path / "ckpt"), cfg, params, tokenizer_dir=str(tmp_path / "tok"))
  ev = (
    "ir_jax.eval",
    "--model",
    ckpt,
    "--data",
    DOCS,
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--policy",
    "dense,informed,greedy",
    "--sparsity",
    "0.5",
    "--no-plot",
    "--json",
  )
  interrupt_at("topk   dense", sig, *ev, str(tmp_path / "a.json"))
  assert not (tmp_path / "a.json").exists()
  run(*ev, str(tmp_path / "a.json"))
  run(*ev, str(tmp_path / "b.json"))
  a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
  for r in a["records"] + b["records"]:
    r.pop("wall_s")
  assert a == b
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json", "ckpt", "tok"]
