"""Hostile and broken input files: each is refused quickly, in bounded memory, with a
one-line user error that says what was expected, and nothing in them is executed.

Every file is crafted by hand in tmp_path. A refusal is checked for: the error
class, a one-line message naming the problem, wall time under MAX_SECONDS and
a tracemalloc peak under MAX_MB (files declare gigabytes to terabytes, so an
allocation of the declared size would show). `test_zz_figures` prints the
totals (run with -s); IR_JAX_HOSTILE_REPORT=FILE also writes them as JSON.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import ir_jax
from ir_jax import tokenizer as ir_tokenizer
from ir_jax.checkpoint import CheckpointError
from ir_jax.config import ConfigError, load_hf_config
from ir_jax.convert import init_routing_params, routing_io
from ir_jax.convert.gguf_io import GGUFFile
from ir_jax.convert.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from ir_jax.convert.sources import WeightImportError
from ir_jax.data.config import DataError
from ir_jax.data.tokenize import load_text_tokenizer
from ir_jax.errors import USER_ERRORS

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = Path(__file__).resolve().parent.parent
MAX_SECONDS = 3.0  # generous: the shared 2-core CI box, tracemalloc slowing Python ~2x
MAX_MB = 50.0
TB = 1 << 40
RECORD: list[dict[str, Any]] = []  # one row per hostile file, for test_zz_figures


def refused(
  case: str,
  fn: Callable[[], Any],
  error: type[BaseException] | tuple,
  *needles: str,
  user_error: bool = True,
) -> str:
  """Runs `fn`, which must raise `error` with a one-line message containing `needles`,
  quickly and without allocating much; returns the message."""
  tracemalloc.start()
  t0 = time.perf_counter()
  try:
    with pytest.raises(error) as info:
      fn()
  finally:
    seconds = time.perf_counter() - t0
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
  msg = str(info.value)
  RECORD.append(
    dict(
      case=case,
      error=type(info.value).__name__,
      seconds=round(seconds, 4),
      peak_mb=round(peak_mb, 2),
      message=msg[:300],
    )
  )
  if user_error:
    assert isinstance(info.value, USER_ERRORS), type(info.value)
  assert msg and "\n" not in msg, msg
  assert "Traceback" not in msg
  for n in needles:
    assert n in msg, (n, msg)
  assert seconds < MAX_SECONDS, (case, seconds)
  assert peak_mb < MAX_MB, (case, peak_mb)
  return msg


_PEAK_WRAPPER = """
import atexit, os, runpy, sys

def _peak():
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
      with open(os.environ["IR_JAX_PEAK_FILE"], "w") as f:
        f.write(line.split()[1])

atexit.register(_peak)
sys.argv = ["ir_jax.convert", "import", *sys.argv[1:]]
runpy.run_module("ir_jax.convert", run_name="__main__", alter_sys=True)
"""


def run_cli_refused(case: str, *args: str, needles: tuple[str, ...] = ()) -> str:
  """`python -m ir_jax.convert import ...` must exit 2 with one stderr line; its peak RSS
  (the child's own VmHWM) stays near the interpreter's own."""
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    peak_file = os.path.join(tmp, "vmhwm_kb")
    # The child reports its own peak (VmHWM of its own address space) at exit. Its
    # rusage cannot: Linux carries the forking parent's high-water RSS into a child
    # (fork copies it, exec keeps it), and this pytest process grows past 3 GB.
    proc = subprocess.run(
      [sys.executable, "-c", _PEAK_WRAPPER, *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, IR_JAX_PEAK_FILE=peak_file),
    )
    out, err = proc.stdout, proc.stderr
    assert os.path.isfile(peak_file), ("the child wrote no peak RSS", err[-2000:])
    rss_mb = int(open(peak_file).read()) / 1024
  seconds = time.perf_counter() - t0
  RECORD.append(
    dict(
      case=case,
      error=f"exit {proc.returncode}",
      seconds=round(seconds, 2),
      peak_rss_mb=round(rss_mb),
      message=err.strip()[:300],
      cli=True,
    )
  )
  assert proc.returncode == 2, (out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("ir_jax.convert: error: "), err
  for n in needles:
    assert n in lines[0], (n, lines[0])
  assert rss_mb < 3000, rss_mb  # jax + numpy import alone is ~0.5-1 GB; a declared TB is not
  assert seconds < 120, seconds
  return lines[0]


# ------------------------------------------------------------------ safetensors
def st_bytes(header: Any, data: bytes = b"", declared: int | None = None) -> bytes:
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def _entry(dtype: str, shape: Any, offsets: Any) -> dict:
  return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


SAFETENSORS_CASES: dict[str, tuple[bytes, str]] = {
  "too short": (b"\x01\x02\x03\x04", "too short"),
  "header length 2**60": (st_bytes({}, declared=1 << 60), "header declares"),
  "header length past end": (st_bytes(b'{"a":1}', declared=1000), "header declares"),
  "header length 2**64-1": (b"\xff" * 8 + b"{}", "header declares"),
  "header not JSON": (st_bytes(b"\x00garbage\xff{{{"), "not valid JSON"),
  "header not UTF-8": (st_bytes(b'{"\xff\xfe": 1}'), "not valid JSON"),
  "header a JSON list": (st_bytes([1, 2, 3]), "must be a JSON object"),
  "header nested 100k deep": (st_bytes(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
  "header int of 10k digits": (
    st_bytes(b'{"w": {"dtype": "F32", "shape": [' + b"9" * 10_000 + b'], "data_offsets": [0, 4]}}'),
    "not valid JSON",
  ),
  "offsets past end, 1 TB tensor": (
    st_bytes({"w": _entry("F32", [1 << 20, 1 << 18], [0, TB])}, b"\0" * 16),
    "inconsistent with 16 data bytes",
  ),
  "offsets overlap": (
    st_bytes({"a": _entry("F32", [4], [0, 16]), "b": _entry("F32", [4], [8, 24])}, b"\0" * 24),
    "overlap",
  ),
  "begin after end": (st_bytes({"w": _entry("F32", [4], [16, 0])}, b"\0" * 16), "inconsistent"),
  "negative offset": (st_bytes({"w": _entry("F32", [4], [-8, 8])}, b"\0" * 16), "inconsistent"),
  "shape product overflows int64": (
    st_bytes({"w": _entry("F32", [1 << 62, 1 << 62], [0, 16])}, b"\0" * 16),
    "inconsistent",
  ),
  "shape disagrees with offsets": (
    st_bytes({"w": _entry("F32", [10], [0, 8])}, b"\0" * 8),
    "40 bytes",
  ),
  "unknown dtype": (st_bytes({"w": _entry("F128", [1], [0, 16])}, b"\0" * 16), "dtype"),
  "negative dimension": (st_bytes({"w": _entry("F32", [-1, 4], [0, 0])}), "negative"),
  "float dimension": (st_bytes({"w": _entry("F32", [2.0], [0, 8])}, b"\0" * 8), "malformed"),
  "string shape": (st_bytes({"w": _entry("F32", "44", [0, 64])}, b"\0" * 64), "malformed"),
  "bool dimension": (st_bytes({"w": _entry("F32", [True], [0, 4])}, b"\0" * 4), "malformed"),
  "three offsets": (st_bytes({"w": _entry("F32", [1], [0, 4, 8])}, b"\0" * 8), "malformed"),
  "entry not an object": (st_bytes({"w": "F32"}), "malformed"),
  "metadata not an object": (st_bytes({"__metadata__": [1, 2]}), "__metadata__"),
  "tensor count explosion (300k entries)": (
    st_bytes(
      b"{"
      + b",".join(
        b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(300_000)
      )
      + b"}"
    ),
    "JSON values",
  ),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_safetensors_reader_refuses(case, tmp_path):
  raw, needle = SAFETENSORS_CASES[case]
  path = tmp_path / "bad.safetensors"
  path.write_bytes(raw)
  refused(
    f"safetensors: {case}", lambda: SafetensorsFile(str(path)), SafetensorsError, str(path), needle
  )


def test_valid_safetensors_still_reads(tmp_path):
  """The checks refuse nothing real: zero-size, unaligned and all dtypes round-trip."""
  tensors = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3),
    "empty": np.zeros((0, 4), np.int8),
    "b": np.arange(3, dtype=np.int64),
    "flag": np.array([True, False]),
  }
  path = str(tmp_path / "ok.safetensors")
  save_file(tensors, path, metadata={"format": "pt"})
  st = SafetensorsFile(path)
  assert st.metadata == {"format": "pt"}
  for k, v in tensors.items():
    np.testing.assert_array_equal(st.get(k), v)


@pytest.fixture(scope="module")
def hf_dir(tiny_hf_dirs) -> Path:
  """A tiny valid HF Llama directory (config.json + model.safetensors, from transformers)."""
  return Path(tiny_hf_dirs["mha_tied_theta1e6"])


def hf_copy(hf_dir: Path, dst: Path) -> Path:
  shutil.copytree(hf_dir, dst)
  return dst


def test_hostile_model_safetensors_through_load_model_and_cli(hf_dir, tmp_path):
  src = hf_copy(hf_dir, tmp_path / "src")
  (src / "model.safetensors").write_bytes(st_bytes({}, declared=1 << 60))
  refused(
    "HF dir: model.safetensors header 2**60 (load_model)",
    lambda: ir_jax.load_model(str(src)),
    SafetensorsError,
    "header declares",
  )
  (src / "model.safetensors").write_bytes(
    st_bytes({"model.embed_tokens.weight": _entry("F32", [1 << 20, 1 << 18], [0, TB])}, b"\0" * 64)
  )
  out = tmp_path / "out"
  run_cli_refused(
    "CLI import: model.safetensors declaring a 1 TB tensor",
    str(src),
    "--out",
    str(out),
    needles=("model.safetensors", "inconsistent"),
  )
  assert not out.exists()


def test_truncated_model_safetensors(hf_dir, tmp_path):
  src = hf_copy(hf_dir, tmp_path / "src")
  st = src / "model.safetensors"
  full = st.read_bytes()
  for frac in (0.5, 0.999):
    st.write_bytes(full[: int(len(full) * frac)])
    refused(
      f"HF dir: model.safetensors cut at {frac:.1%}",
      lambda: ir_jax.load_model(str(src)),
      SafetensorsError,
      "inconsistent",
    )


def test_hostile_safetensors_index(hf_dir, tmp_path):
  src = hf_copy(hf_dir, tmp_path / "src")
  index = src / "model.safetensors.index.json"
  cases = {
    "not JSON": (b"\x89PNG\r\n", WeightImportError, "not a valid safetensors index"),
    "no weight_map": (b'{"metadata": {}}', WeightImportError, "weight_map"),
    "weight_map a list": (b'{"weight_map": [1, 2]}', WeightImportError, "weight_map"),
    "weight_map to ints": (b'{"weight_map": {"a": 5}}', WeightImportError, "weight_map"),
    "nested 100k deep": (
      b'{"weight_map": ' + b"[" * 100_000,
      WeightImportError,
      "not a valid safetensors index",
    ),
    # basename() keeps it inside the directory, where there is no such shard.
    "path escaping the directory": (
      b'{"weight_map": {"a": "../../../etc/passwd"}}',
      FileNotFoundError,
      "passwd",
    ),
  }
  for case, (raw, error, needle) in cases.items():
    index.write_bytes(raw)
    refused(f"HF dir: index {case}", lambda: ir_jax.load_model(str(src)), error, needle)


def test_pickle_only_directory_is_never_unpickled(hf_dir, tmp_path):
  src = hf_copy(hf_dir, tmp_path / "src")
  os.remove(src / "model.safetensors")
  marker = tmp_path / "PWNED"

  class Exploit:
    def __reduce__(self):
      return (open, (str(marker), "w"))

  (src / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
  refused(
    "HF dir: pytorch_model.bin only (malicious pickle)",
    lambda: ir_jax.load_model(str(src)),
    FileNotFoundError,
    "pickled weights are never loaded",
  )
  out = tmp_path / "out"
  run_cli_refused(
    "CLI import: pytorch_model.bin only (malicious pickle)",
    str(src),
    "--out",
    str(out),
    needles=("pytorch_model.bin", "safetensors"),
  )
  assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------ config.json
CONFIG_CASES: dict[str, tuple[Any, str]] = {
  "vocab_size 10**12": ({"vocab_size": 10**12}, "vocab_size"),
  "vocab_size 10**400": ({"vocab_size": 10**400}, "vocab_size"),
  "hidden_size 10**9": ({"hidden_size": 10**9}, "hidden_size"),
  "intermediate_size 10**15": ({"intermediate_size": 10**15}, "intermediate_size"),
  "num_hidden_layers negative": ({"num_hidden_layers": -3}, "num_layers"),
  "num_attention_heads a string": ({"num_attention_heads": "4"}, "num_heads"),
  "hidden_size a float": ({"hidden_size": 40.5}, "hidden_size"),
  "vocab_size true": ({"vocab_size": True}, "vocab_size"),
  "max_position_embeddings 2**40": (
    {"max_position_embeddings": 1 << 40},
    "max_position_embeddings",
  ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_json_with_absurd_values(case, hf_dir, tmp_path):
  src = hf_copy(hf_dir, tmp_path / "src")
  fields, needle = CONFIG_CASES[case]
  cfg = json.loads((src / "config.json").read_text())
  cfg.update(fields)
  # json.dumps writes 10**400 as digits; Python reads it back as an int.
  (src / "config.json").write_text(json.dumps(cfg))
  refused(
    f"config.json: {case}", lambda: ir_jax.load_model(str(src)), ConfigError, "config.json", needle
  )


def test_config_json_absurd_vocab_through_cli(hf_dir, tmp_path):
  src = hf_copy(hf_dir, tmp_path / "src")
  cfg = json.loads((src / "config.json").read_text())
  cfg["vocab_size"] = 10**12
  (src / "config.json").write_text(json.dumps(cfg))
  out = tmp_path / "out"
  run_cli_refused(
    "CLI import: config.json vocab_size 10**12",
    str(src),
    "--out",
    str(out),
    needles=("config.json", "vocab_size"),
  )
  assert not out.exists()


CONFIG_FILE_CASES = {
  "not JSON": (b"vocab_size = 10", "not valid JSON"),
  "not UTF-8": (b'{"vocab_size": "\xff\xfe"}', "not valid JSON"),
  "a JSON list": (b"[1, 2]", "expected a JSON object"),
  "empty": (b"", "not valid JSON"),
}


@pytest.mark.parametrize("case", list(CONFIG_FILE_CASES))
def test_config_json_not_a_config(case, hf_dir, tmp_path):
  src = hf_copy(hf_dir, tmp_path / "src")
  raw, needle = CONFIG_FILE_CASES[case]
  (src / "config.json").write_bytes(raw)
  refused(
    f"config.json: {case}", lambda: ir_jax.load_model(str(src)), ConfigError, "config.json", needle
  )


@pytest.mark.parametrize(
  "raw",
  [b"[" * 100_000, b'{"vocab_size": ' + b"9" * 10_000 + b"}"],
  ids=["nested 100k deep", "int of 10k digits"],
)
def test_config_json_that_breaks_the_json_parser(raw, hf_dir, tmp_path):
  src = hf_copy(hf_dir, tmp_path / "src")
  (src / "config.json").write_bytes(raw)
  refused(
    "config.json: breaks json (nesting / digits)",
    lambda: ir_jax.load_model(str(src)),
    ConfigError,
    "config.json",
  )


# ------------------------------------------------------------------ tokenizer.json
TOKENIZER_CASES: dict[str, bytes] = {
  "binary garbage": b"\x00\x01\x02\xff" * 64,
  "not UTF-8": b'{"model": "\xff"}',
  "truncated JSON": b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"a"',
  "a JSON list": b"[1, 2, 3]",
  "an empty object": b"{}",
  "model a number": b'{"model": 5}',
  "model an empty object": b'{"model": {}}',
  "BPE merge of unknown tokens": (
    b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["zz yy"]}}'
  ),
  "token id past u32": (
    b'{"version": "1.0", "model": {"type": "WordLevel", '
    b'"vocab": {"a": 18446744073709551615}, "unk_token": "a"}}'
  ),
  "added token id 10**11": (
    b'{"version": "1.0", "added_tokens": [{"id": 99999999999, '
    b'"content": "x"}], "model": {"type": "BPE", "vocab": {}, '
    b'"merges": []}}'
  ),
  "nested 100k deep": b"[" * 100_000 + b"]" * 100_000,
  "int of 10k digits": b'{"model": ' + b"9" * 10_000 + b"}",
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_tokenizer_json_that_is_not_a_tokenizer(case, tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_bytes(TOKENIZER_CASES[case])
  refused(
    f"tokenizer.json: {case} (load_text_tokenizer)",
    lambda: load_text_tokenizer(str(path)),
    DataError,
    str(path),
    "tokenizer.json",
  )
  # A library function: load_text_tokenizer (above) and the CLIs make it a user error.
  refused(
    f"tokenizer.json: {case} (load_tokenizer)",
    lambda: ir_tokenizer.load_tokenizer(path),
    ir_tokenizer.TokenizerError,
    "tokenizer.json",
    user_error=False,
  )


def test_perplexity_cli_with_a_garbage_tokenizer(hf_dir, tmp_path, capsys):
  from ir_jax import perplexity
  from ir_jax.errors import cli_main

  src = hf_copy(hf_dir, tmp_path / "src")
  (src / "tokenizer.json").write_bytes(b"\x00\xff garbage")
  text = tmp_path / "t.txt"
  text.write_text("hello world")
  with pytest.raises(SystemExit) as info:
    cli_main(
      lambda: perplexity.main(["--model", str(src), "--text", str(text)]), "ir_jax.perplexity"
    )
  assert info.value.code == 2
  assert "tokenizer.json" in capsys.readouterr().err


# ------------------------------------------------------------------ GGUF
def gstr(s: str | bytes) -> bytes:
  b = s.encode() if isinstance(s, str) else s
  return struct.pack("<Q", len(b)) + b


def gguf_head(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
  return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv(key: str, vtype: int, payload: bytes) -> bytes:
  return gstr(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, dims: list[int], ttype: int, offset: int) -> bytes:
  return (
    gstr(name)
    + struct.pack("<I", len(dims))
    + struct.pack(f"<{len(dims)}Q", *dims)
    + struct.pack("<IQ", ttype, offset)
  )


ARCH = kv("general.architecture", 8, gstr("llama"))
PAD = b"\0" * 64
GGUF_CASES: dict[str, tuple[bytes, str]] = {
  "empty file": (b"", "too short"),
  "bad magic": (b"GGML" + b"\0" * 60, "bad magic"),
  "version 99": (gguf_head(0, 0, 99) + PAD, "version 99"),
  "big-endian version": (b"GGUF" + struct.pack(">I", 3) + b"\0" * 60, "big-endian"),
  "tensor count 2**63": (gguf_head(1 << 63, 0) + PAD, "declares"),
  "kv count 2**63": (gguf_head(0, 1 << 63) + PAD, "declares"),
  "key length 2**63": (gguf_head(0, 1) + struct.pack("<Q", 1 << 63) + PAD, "metadata key 0"),
  "string value length 2**62": (
    gguf_head(0, 1) + gstr("k") + struct.pack("<IQ", 8, 1 << 62) + PAD,
    "truncated",
  ),
  # gguf.GGUFReader loops forever on this one: reads past the end return empty arrays.
  "uint8 array of 2**62 items": (
    gguf_head(0, 1) + gstr("k") + struct.pack("<IIQ", 9, 0, 1 << 62) + PAD,
    "array of",
  ),
  "uint32 array of 2**20 items in 64 bytes": (
    gguf_head(0, 1) + gstr("k") + struct.pack("<IIQ", 9, 4, 1 << 20) + PAD,
    "truncated",
  ),
  "string array of 2**23 items in 64 bytes": (
    gguf_head(0, 1) + gstr("k") + struct.pack("<IIQ", 9, 8, 1 << 23) + PAD,
    "truncated",
  ),
  "arrays nested 5 deep": (
    gguf_head(0, 1) + gstr("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5 + PAD,
    "nested",
  ),
  "unknown value type": (gguf_head(0, 1) + kv("k", 77, b"") + PAD, "unknown value type"),
  "duplicate key": (gguf_head(0, 2) + ARCH + ARCH + PAD, "twice"),
  "tensor with 2**31 dims": (
    gguf_head(1, 1) + ARCH + gstr("t") + struct.pack("<I", 1 << 31) + PAD,
    "dimensions",
  ),
  "1 TB tensor in a tiny file": (
    gguf_head(1, 1) + ARCH + tensor_info("token_embd.weight", [1 << 18, 1 << 20], 0, 0) + PAD,
    "runs past the end",
  ),
  "dims whose product overflows uint64": (
    gguf_head(1, 1) + ARCH + tensor_info("t", [1 << 40, 1 << 40, 1 << 40], 0, 0) + PAD,
    "runs past the end",
  ),
  "tensor offset 2**63": (
    gguf_head(1, 1) + ARCH + tensor_info("t", [4], 0, 1 << 63) + PAD,
    "runs past the end",
  ),
  "unknown tensor type": (
    gguf_head(1, 1) + ARCH + tensor_info("t", [4], 999, 0) + PAD,
    "unknown tensor type",
  ),
  "alignment not a power of two": (
    gguf_head(0, 2) + ARCH + kv("general.alignment", 4, struct.pack("<I", 3)) + PAD,
    "alignment",
  ),
}
GGUF_CASES["key not UTF-8"] = (  # built apart: the bytes are not a str
  gguf_head(0, 1) + struct.pack("<Q", 3) + b"\xff\xfe\xfd" + struct.pack("<I", 4) + b"\0" * 4 + PAD,
  "not UTF-8",
)


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_reader_refuses(case, tmp_path):
  raw, needle = GGUF_CASES[case]
  path = tmp_path / "bad.gguf"
  path.write_bytes(raw)
  refused(
    f"GGUF: {case} (load_model)",
    lambda: ir_jax.load_model(str(path)),
    WeightImportError,
    str(path),
    "not a readable GGUF file",
    needle,
  )


def write_tiny_gguf(path: Path) -> Path:
  """A complete tiny Llama GGUF (F32 weights, a byte-level BPE tokenizer) via gguf.GGUFWriter."""
  import gguf

  v, d, f, layers, heads = 8, 16, 24, 2, 2
  rng = np.random.RandomState(0)
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_context_length(64)
  w.add_embedding_length(d)
  w.add_block_count(layers)
  w.add_feed_forward_length(f)
  w.add_head_count(heads)
  w.add_head_count_kv(heads)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(["<s>", "</s>", "h", "i", "Ġ", "hi", "Ġhi", "x"])
  w.add_token_types([3, 3, 1, 1, 1, 1, 1, 1])
  w.add_token_merges(["h i", "Ġ hi"])
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
  for i in range(layers):
    shapes.update(
      {
        f"blk.{i}.attn_norm.weight": (d,),
        f"blk.{i}.ffn_norm.weight": (d,),
        f"blk.{i}.attn_q.weight": (d, d),
        f"blk.{i}.attn_k.weight": (d, d),
        f"blk.{i}.attn_v.weight": (d, d),
        f"blk.{i}.attn_output.weight": (d, d),
        f"blk.{i}.ffn_gate.weight": (f, d),
        f"blk.{i}.ffn_up.weight": (f, d),
        f"blk.{i}.ffn_down.weight": (d, f),
      }
    )
  for name, shape in shapes.items():
    w.add_tensor(name, rng.randn(*shape).astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_truncated_gguf_at_every_section(tmp_path):
  import gguf

  good = write_tiny_gguf(tmp_path / "good.gguf")
  model = ir_jax.load_model(str(good))  # the uncut file imports
  assert model.config.num_layers == 2
  full = good.read_bytes()
  trusted = gguf.GGUFReader(good)  # our own file: safe for the reference reader
  kvs = [f for k, f in trusted.fields.items() if not k.startswith("GGUF.")]
  cuts = {
    "in the magic": 2,
    "in the version": 6,
    "in the counts": 17,
    "in the first key": kvs[0].offset + 5,
    "in the token list": trusted.fields["tokenizer.ggml.tokens"].offset + 40,
    "in the last metadata value": kvs[-1].offset + 10,
    "in the first tensor info": trusted.tensors[0].field.offset + 3,
    "in the last tensor info": trusted.tensors[-1].field.offset + 12,
    "in the alignment padding": trusted.tensors[-1].field.offset
    + sum(int(p.nbytes) for p in trusted.tensors[-1].field.parts)
    + 1,
    "in the first tensor's data": trusted.tensors[0].data_offset + 8,
    "4 bytes before the end": len(full) - 4,
  }
  for where, n in cuts.items():
    cut = tmp_path / f"cut_{n}.gguf"
    cut.write_bytes(full[:n])
    refused(
      f"GGUF truncated {where} (load_model)",
      lambda: ir_jax.load_model(str(cut)),
      WeightImportError,
      str(cut),
      "not a readable GGUF file",
    )
  cut = tmp_path / "cut_cli.gguf"
  cut.write_bytes(full[: trusted.tensors[-1].data_offset + 8])
  out = tmp_path / "out"
  run_cli_refused(
    "CLI import: GGUF truncated in the data",
    str(cut),
    "--out",
    str(out),
    needles=("cut_cli.gguf", "runs past the end"),
  )
  assert not out.exists()
  cut.write_bytes(full[: trusted.fields["tokenizer.ggml.tokens"].offset + 40])
  refused(
    "GGUF truncated in the token list (load_text_tokenizer)",
    lambda: load_text_tokenizer(str(cut)),
    DataError,
    str(cut),
    "not a readable GGUF",
  )


def test_gguf_with_wrong_metadata_types(tmp_path):
  import gguf

  def write(name: str, fields: dict[str, tuple[Any, Any]]) -> Path:
    path = tmp_path / name
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype) in fields.items():
      w.add_key_value(
        key,
        value,
        vtype,
        sub_type=None
        if vtype != T.ARRAY
        else (T.STRING if isinstance(value[0], str) else T.UINT32),
      )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

  T = gguf.GGUFValueType
  base = {
    "llama.attention.head_count": (2, T.UINT32),
    "llama.embedding_length": (16, T.UINT32),
    "llama.feed_forward_length": (24, T.UINT32),
    "llama.block_count": (2, T.UINT32),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32),
    "llama.vocab_size": (8, T.UINT32),
  }
  cases = {
    "block_count a string": ({"llama.block_count": ("two", T.STRING)}, "llama.block_count"),
    "head_count an array": (
      {"llama.attention.head_count": ([2, 2], T.ARRAY)},
      "llama.attention.head_count",
    ),
    "head_count 0": ({"llama.attention.head_count": (0, T.UINT32)}, "num_heads"),
    "vocab 10**12": ({"llama.vocab_size": (10**12, T.UINT64)}, "vocab_size"),
    "block_count 2**63": ({"llama.block_count": (1 << 63, T.UINT64)}, "num_layers"),
    "rms eps a string": (
      {"llama.attention.layer_norm_rms_epsilon": ("x", T.STRING)},
      "layer_norm_rms_epsilon",
    ),
    "bos id a string": ({"tokenizer.ggml.bos_token_id": ("0", T.STRING)}, "bos_token_id"),
  }
  for case, (fields, needle) in cases.items():
    path = write(re.sub(r"\W", "_", case) + ".gguf", {**base, **fields})
    refused(
      f"GGUF metadata: {case} (load_model)",
      lambda: ir_jax.load_model(str(path)),
      WeightImportError,
      str(path),
      needle,
    )
  bad_tokens = write(
    "tokens_ints.gguf",
    {
      "tokenizer.ggml.model": ("gpt2", T.STRING),
      "tokenizer.ggml.tokens": ([1, 2, 3], T.ARRAY),
      "tokenizer.ggml.merges": (["a b"], T.ARRAY),
    },
  )
  refused(
    "GGUF tokenizer: tokens are integers (load_text_tokenizer)",
    lambda: load_text_tokenizer(str(bad_tokens)),
    DataError,
    "tokenizer.ggml.tokens",
  )


def test_our_gguf_reader_matches_gguf_package(tmp_path):
  """Same fields and tensors as gguf.GGUFReader on a valid file (all value types)."""
  import gguf

  path = write_tiny_gguf(tmp_path / "good.gguf")
  w = gguf.GGUFWriter(str(tmp_path / "types.gguf"), "llama")
  T = gguf.GGUFValueType
  values = [
    (7, T.UINT8, None),
    (-7, T.INT8, None),
    (700, T.UINT16, None),
    (-700, T.INT16, None),
    (70000, T.UINT32, None),
    (-70000, T.INT32, None),
    (0.5, T.FLOAT32, None),
    (True, T.BOOL, None),
    ("é", T.STRING, None),
    (1 << 40, T.UINT64, None),
    (-(1 << 40), T.INT64, None),
    (0.25, T.FLOAT64, None),
    ([1.5, 2.5], T.ARRAY, T.FLOAT32),
    (["a", "bc"], T.ARRAY, T.STRING),
    ([3, 4], T.ARRAY, T.INT64),
  ]
  for i, (value, vtype, sub) in enumerate(values):
    w.add_key_value(f"k{i}", value, vtype, sub_type=sub)
  q8 = gguf.quants.quantize(
    np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), gguf.GGMLQuantizationType.Q8_0
  )
  w.add_tensor("q", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
  w.add_tensor("h", np.arange(6, dtype=np.float16).reshape(2, 3))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  for p in (path, tmp_path / "types.gguf"):
    ours, theirs = GGUFFile(p), gguf.GGUFReader(p)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for k in keys:
      a, b = ours.fields[k].contents(), theirs.fields[k].contents()
      assert a == b and type(a) is type(b), (k, a, b)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
      assert a.tensor_type == b.tensor_type and a.shape == tuple(int(x) for x in b.shape)
      assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
      np.testing.assert_array_equal(a.data, b.data)


# ------------------------------------------------------------------ exported dir (routing)
@pytest.fixture(scope="module")
def exported_dir(hf_dir, tmp_path_factory) -> Path:
  """A HF dir with routing.json + routing.safetensors beside it, as `export` writes them."""
  out = hf_copy(hf_dir, tmp_path_factory.mktemp("exp") / "exported")
  cfg = load_hf_config(str(out))
  routing_io.write(str(out), cfg, init_routing_params(cfg), "ir_jax", spec=None, lora={}, source={})
  ir_jax.load_model(str(out))  # the intact directory loads
  return out


def test_corrupt_routing_files(exported_dir, tmp_path):
  manifest = json.loads((exported_dir / "routing.json").read_text())
  weights = (exported_dir / "routing.safetensors").read_bytes()

  def with_files(name: str, routing_json: bytes | None, routing_st: bytes | None) -> Path:
    d = hf_copy(exported_dir, tmp_path / name)
    for fname, raw in (("routing.json", routing_json), ("routing.safetensors", routing_st)):
      if raw is None:
        os.remove(d / fname)
      else:
        (d / fname).write_bytes(raw)
    return d

  def dumps(**changes) -> bytes:
    return json.dumps({**manifest, **changes}).encode()

  cases = {
    "routing.json garbage": (b"\x00\xffnot json", weights, WeightImportError, "not valid JSON"),
    "routing.json a list": (b"[]", weights, WeightImportError, "expected a JSON object"),
    "routing.json wrong format": (dumps(format="pytorch"), weights, WeightImportError, "format"),
    "routing.json version 99": (dumps(version=99), weights, WeightImportError, "version"),
    "routing.json unknown layout": (dumps(layout="evil"), weights, WeightImportError, "layout"),
    "routing.json model not an object": (dumps(model=[1]), weights, WeightImportError, "model"),
    "routing.json lff_rank 10**12": (
      dumps(model={**manifest["model"], "lff_rank": 10**12}),
      weights,
      WeightImportError,
      "lff_rank",
    ),
    "routing.json spec sparsity 5": (
      dumps(spec={"policy": "informed", "sparsity": 5.0}),
      weights,
      WeightImportError,
      "routing spec",
    ),
    "routing.safetensors missing": (dumps(), None, WeightImportError, "routing.safetensors"),
    "routing.safetensors cut in half": (
      dumps(),
      weights[: len(weights) // 2],
      SafetensorsError,
      "inconsistent",
    ),
    "routing.safetensors header 2**60": (
      dumps(),
      st_bytes({}, declared=1 << 60),
      SafetensorsError,
      "header declares",
    ),
    "routing.safetensors empty header": (dumps(), st_bytes({}), WeightImportError, "missing"),
  }
  for case, (rj, rs, error, needle) in cases.items():
    d = with_files(re.sub(r"\W", "_", case), rj, rs)
    refused(
      f"exported dir: {case} (load_model)",
      lambda: ir_jax.load_model(str(d)),
      error,
      "routing",
      needle,
    )


# ------------------------------------------------------------------ ir_jax.json
def test_garbage_ir_jax_json(tmp_path):
  ok_model = {
    "vocab_size": 8,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_layers": 1,
    "num_heads": 2,
    "num_kv_heads": 2,
  }

  def meta(**changes) -> bytes:
    return json.dumps(
      {"format": "ir_jax.model", "version": 1, "model": ok_model, **changes}
    ).encode()

  cases = {
    "binary garbage": (b"\x89HDF\r\n\x1a\n" + bytes(range(256)), "not valid JSON"),
    "empty": (b"", "not valid JSON"),
    "a JSON string": (b'"ir_jax"', "expected a JSON object"),
    "wrong format": (meta(format="torch"), "format"),
    "version 99": (meta(version=99), "version"),
    "model a list": (meta(model=[1, 2]), "bad model config"),
    "model vocab 10**12": (meta(model={**ok_model, "vocab_size": 10**12}), "vocab_size"),
    "model unknown field": (meta(model={**ok_model, "__class__": "os.system"}), "unknown"),
    "model lacks fields": (meta(model={"vocab_size": 8}), "lacks"),
    "no params dir": (meta(), "params/"),
  }
  for case, (raw, needle) in cases.items():
    d = tmp_path / re.sub(r"\W", "_", case)
    d.mkdir()
    (d / "ir_jax.json").write_bytes(raw)
    refused(
      f"ir_jax.json: {case} (load_model)",
      lambda: ir_jax.load_model(str(d)),
      CheckpointError,
      "ir_jax.json" if case != "no params dir" else "params",
      needle,
    )


def test_ir_jax_json_that_breaks_the_json_parser(tmp_path):
  (tmp_path / "ir_jax.json").write_bytes(b"[" * 100_000)
  refused(
    "ir_jax.json: nested 100k deep",
    lambda: ir_jax.load_model(str(tmp_path)),
    CheckpointError,
    "ir_jax.json",
  )


# ------------------------------------------------------------------ no code execution
# Every way a Python package can run code from a data file. Only uses that read no
# file, or run a file the user names as code on purpose, may appear.
FORBIDDEN = re.compile(
  r"\bpickle\b|\bcPickle\b|\bdill\b|\bcloudpickle\b|\bjoblib\b|\bmarshal\b"
  r"|\bshelve\b|torch\.load|trust_remote_code\s*=\s*True|allow_pickle\s*=\s*True"
  r"|yaml\.load\(|yaml\.unsafe_load|(?<![\w.])eval\(|(?<![\w.])exec\("
  r"|__import__\(|runpy|importlib\.import_module|exec_module"
)
ALLOWED = {
  # The refusal message itself: "pickled weights are never loaded".
  ("ir_jax/convert/sources.py", "pickled weights are never loaded"),
  # `--config FILE`: configs/*.py are Python by design (ml_collections' get_config()),
  # named by the user as code to run, like DEFINE_config_file in ir_jax.train.
  ("ir_jax/config_file.py", "spec.loader.exec_module(mod)"),
  # The lazy package attributes (PEP 562): module names from a fixed table in the
  # package itself, or `ir_jax.<attribute>` for an existing submodule; never from a file.
  ("ir_jax/__init__.py", "importlib.import_module(_LAZY[name])"),
  ("ir_jax/__init__.py", 'importlib.import_module(f"ir_jax.{name}")'),
  ("ir_jax/train/__init__.py", "importlib.import_module(_LAZY[name])"),
  # Docstrings naming the eval step's signature, not calls.
  ("ir_jax/train/stepfns.py", '"""eval(state, batch)'),
  ("ir_jax/train/steps.py", '"""eval(state, batch)'),
}


def test_no_code_execution_from_files():
  hits = []
  for path in sorted((REPO / "ir_jax").rglob("*.py")):
    rel = path.relative_to(REPO).as_posix()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      code = line.split("#", 1)[0]
      if FORBIDDEN.search(code) and not any(rel == f and s in line for f, s in ALLOWED):
        hits.append(f"{rel}:{n}: {line.strip()}")
  assert not hits, "\n".join(hits)


# ------------------------------------------------------------------ figures
def test_zz_figures():
  """Totals for docs/reliability.md (runs last in this file)."""
  if not RECORD:
    pytest.skip("run with the rest of this file")
  inproc = [r for r in RECORD if not r.get("cli")]
  cli = [r for r in RECORD if r.get("cli")]
  summary = {
    "hostile_files_tried": len(RECORD),
    "refused_cleanly": len(RECORD),  # refused() asserts; a failure would have failed its test
    "in_process": len(inproc),
    "cli": len(cli),
    "max_refusal_seconds_in_process": max(r["seconds"] for r in inproc),
    "max_tracemalloc_peak_mb": max(r["peak_mb"] for r in inproc),
    "slowest": max(inproc, key=lambda r: r["seconds"])["case"],
    "largest_peak": max(inproc, key=lambda r: r["peak_mb"])["case"],
    "max_cli_seconds": max((r["seconds"] for r in cli), default=None),
    "max_cli_peak_rss_mb": max((r["peak_rss_mb"] for r in cli), default=None),
  }
  # The totals are only worth printing if every recorded refusal was clean: one line, no
  # traceback, within the budgets, and the CLI ones exit 2.
  for r in RECORD:
    assert r["message"] and "\n" not in r["message"] and "Traceback" not in r["message"], r
    if r.get("cli"):
      assert r["error"] == "exit 2" and r["peak_rss_mb"] < 3000 and r["seconds"] < 120, r
    else:
      assert r["seconds"] < MAX_SECONDS and r["peak_mb"] < MAX_MB, r
  assert summary["in_process"] > 0 and summary["cli"] > 0  # both kinds ran
  print("\nhostile input figures:", json.dumps(summary, indent=1))
  for r in RECORD:
    print(
      f"  {r['case']}: {r['error']} {r['seconds']}s "
      f"{r.get('peak_mb', r.get('peak_rss_mb'))}MB | {r['message'][:140]}"
    )
  if os.environ.get("IR_JAX_HOSTILE_REPORT"):
    Path(os.environ["IR_JAX_HOSTILE_REPORT"]).write_text(
      json.dumps({"summary": summary, "cases": RECORD}, indent=1)
    )
