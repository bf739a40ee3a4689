"""Import CLI, the checkpoint round trip, and the errors users meet on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama_config

import ir_jax
from ir_jax.config import ConfigError
from ir_jax.convert import mapping
from ir_jax.convert.safetensors_io import SafetensorsFile, save_file
from ir_jax.convert.sources import WeightImportError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "ir_jax.convert", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


def copy_hf(src: str, dst: str) -> str:
  shutil.copytree(src, dst)
  return dst


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  for n in needles:
    assert n in lines[0], lines[0]


def assert_nothing_written(out: str) -> None:
  assert not os.path.exists(out)
  parent = os.path.dirname(out)
  leftovers = [f for f in os.listdir(parent) if ".partial-" in f]
  assert not leftovers, leftovers


def test_cli_import_then_load_checkpoint(tiny_hf_dirs, tmp_path):
  src = copy_hf(tiny_hf_dirs["gqa_llama3_untied"], str(tmp_path / "src"))
  out = str(tmp_path / "ckpt")
  proc = run_cli("import", "--format", "hf", src, "--out", out)
  assert proc.returncode == 0, proc.stderr
  assert os.path.isfile(os.path.join(out, "ir_jax.json"))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 13)), jnp.int32)
  direct = np.asarray(ir_jax.load_model(src)(tokens))
  # The checkpoint loads without the source, and gives the same logits.
  shutil.rmtree(src)
  restored = np.asarray(ir_jax.load_model(out)(tokens))
  np.testing.assert_array_equal(restored, direct)
  src = tiny_hf_dirs["gqa_llama3_untied"]
  # Refuses to overwrite by default.
  again = run_cli("import", src, "--out", out)
  assert_one_line_error(again, out, "--overwrite")


def test_mapping_round_trip_is_exact():
  rng = np.random.RandomState(0)
  for e in mapping.TABLE:
    ours = {"o_proj": (3, 5, 8), "q_proj": (8, 3, 5), "k_proj": (8, 1, 5), "v_proj": (8, 1, 5)}.get(
      e.path[-1], (8, 6) if e.transform == "linear" else (8,)
    )
    w = rng.randn(*ours).astype(np.float32)
    hf = mapping.to_hf(e, w)
    assert hf.shape == mapping.hf_shape(e, ours)
    np.testing.assert_array_equal(mapping.to_ours(e, hf, ours), w)


def test_directory_without_config(tmp_path):
  src = tmp_path / "empty"
  src.mkdir()
  out = str(tmp_path / "out")
  proc = run_cli("import", "--format", "hf", str(src), "--out", out)
  assert_one_line_error(proc, str(src), "config.json")
  assert_nothing_written(out)
  with pytest.raises(FileNotFoundError, match="config.json"):
    ir_jax.load_model(str(src))


def test_safetensors_missing_a_tensor(tiny_hf_dirs, tmp_path):
  src = copy_hf(tiny_hf_dirs["gqa_llama3_untied"], str(tmp_path / "src"))
  st_path = os.path.join(src, "model.safetensors")
  st = SafetensorsFile(st_path)
  drop = "model.layers.1.mlp.up_proj.weight"
  tensors = {k: st.get(k) for k in st.keys() if k != drop}
  save_file(tensors, st_path)
  out = str(tmp_path / "out")
  proc = run_cli("import", src, "--out", out)
  assert_one_line_error(proc, st_path, drop, "missing")
  assert_nothing_written(out)


def test_shape_that_does_not_match_config(tiny_hf_dirs, tmp_path):
  src = copy_hf(tiny_hf_dirs["gqa_llama3_untied"], str(tmp_path / "src"))
  cfg_file = os.path.join(src, "config.json")
  with open(cfg_file) as f:
    cfg = json.load(f)
  cfg["intermediate_size"] = 96  # the weights were saved with 80
  with open(cfg_file, "w") as f:
    json.dump(cfg, f)
  out = str(tmp_path / "out")
  proc = run_cli("import", src, "--out", out)
  assert_one_line_error(proc, "model.safetensors", "gate_proj", "[80, 48]", "[96, 48]")
  assert_nothing_written(out)


def test_gguf_of_unsupported_architecture(tmp_path):
  import gguf

  path = str(tmp_path / "gpt2.gguf")
  w = gguf.GGUFWriter(path, "gpt2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  out = str(tmp_path / "out")
  proc = run_cli("import", "--format", "gguf", path, "--out", out)
  assert_one_line_error(proc, path, "'gpt2'", "not supported")
  assert_nothing_written(out)


def test_truncated_gguf(tmp_path):
  path = tmp_path / "cut.gguf"
  path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
  with pytest.raises(WeightImportError, match="not a readable GGUF"):
    ir_jax.load_model(str(path))


def test_pickled_weights_are_refused(tiny_hf_dirs, tmp_path):
  src = copy_hf(tiny_hf_dirs["gqa_llama3_untied"], str(tmp_path / "src"))
  os.remove(os.path.join(src, "model.safetensors"))
  open(os.path.join(src, "pytorch_model.bin"), "wb").close()
  with pytest.raises(FileNotFoundError, match="pickled weights are never loaded"):
    ir_jax.load_model(src)


def test_config_values_are_validated():
  with pytest.raises(ConfigError, match="num_kv_heads"):
    tiny_llama_config(num_heads=3, num_kv_heads=2)
  with pytest.raises(ConfigError, match="vocab_size"):
    tiny_llama_config(vocab_size=10**12)
  with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
    tiny_llama_config(rope_scaling={"rope_type": "yarn"})


def test_safetensors_header_offsets_past_end(tmp_path):
  path = str(tmp_path / "bad.safetensors")
  header = json.dumps(
    {"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}
  ).encode()
  with open(path, "wb") as f:
    f.write(len(header).to_bytes(8, "little") + header + b"\x00" * 16)
  with pytest.raises(ValueError, match="inconsistent with 16 data bytes"):
    SafetensorsFile(path)


def test_import_and_export_report_progress_per_tensor(tiny_hf_dirs, tmp_path):
  from ir_jax.convert import import_weights
  from ir_jax.convert.export import export

  src = tiny_hf_dirs["gqa_llama3_untied"]
  n_src = len(SafetensorsFile(os.path.join(src, "model.safetensors")).keys())
  calls: list[tuple[int, int]] = []
  out = import_weights(src, str(tmp_path / "ckpt"), progress=lambda d, t: calls.append((d, t)))
  assert calls == [(i, n_src) for i in range(1, n_src + 1)]
  calls.clear()
  exp = export(out, str(tmp_path / "hf"), progress=lambda d, t: calls.append((d, t)))
  n_out = len(SafetensorsFile(os.path.join(exp, "model.safetensors")).keys())
  assert n_out == n_src and calls == [(i, n_out) for i in range(1, n_out + 1)]
