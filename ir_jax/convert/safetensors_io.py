"""A validating safetensors reader (memory-mapped) and writer, numpy only.

We parse the header ourselves so a hostile file is refused before any
allocation: header size, dtypes, shapes, offsets and overlaps are checked
against the file size first. Tensors are then read lazily from a memmap.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from ir_jax.base_error import IrJaxError

_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
# JSON values a header may hold (counted before parsing, so a header of a
# million tiny entries never becomes a million Python objects). A tensor
# takes ~8; a 1,024-layer Llama with routing modules has ~25,000 tensors.
_MAX_JSON_VALUES = 2_000_000


def _is_int(v: object) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsError(IrJaxError, ValueError):
  """A safetensors file is malformed or inconsistent."""


class SafetensorsFile:
  """Random access to the tensors of one `.safetensors` file."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
    except OSError as e:
      raise FileNotFoundError(f"{path}: cannot open safetensors file ({e.strerror})") from None
    if size < 8:
      raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      # Checked before reading: f.read(n) would allocate n bytes up front.
      if n > min(_MAX_HEADER, size - 8):
        raise SafetensorsError(
          f"{path}: header declares {n} bytes but the file has {size - 8} after the length "
          f"(at most {_MAX_HEADER}); truncated or not a safetensors file"
        )
      raw = f.read(n)
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")  # >= JSON values - 1
    if values > _MAX_JSON_VALUES:
      raise SafetensorsError(
        f"{path}: header holds ~{values} JSON values, more than the "
        f"{_MAX_JSON_VALUES} of any model file; refusing to parse it"
      )
    try:
      header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
      raise SafetensorsError(
        f"{path}: header is not valid JSON ({str(e)[:200]}); not a safetensors file"
      ) from None
    del raw
    if not isinstance(header, dict):
      raise SafetensorsError(
        f"{path}: header must be a JSON object of tensor entries, found {type(header).__name__}"
      )
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
      raise SafetensorsError(f"{path}: __metadata__ must be an object of strings")
    self.metadata = meta
    data_size = size - 8 - n
    self._base = 8 + n
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    spans = []
    for name, info in header.items():
      ok = (
        isinstance(info, dict)
        and isinstance(info.get("dtype"), str)
        and isinstance(info.get("shape"), list)
        and all(map(_is_int, info["shape"]))
        and isinstance(info.get("data_offsets"), list)
        and len(info["data_offsets"]) == 2
        and all(map(_is_int, info["data_offsets"]))
      )
      if not ok:
        raise SafetensorsError(
          f"{path}: tensor {name!r} has a malformed entry {str(info)[:200]}; expected "
          '{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}'
        )
      if info["dtype"] not in _DTYPES:
        raise SafetensorsError(
          f"{path}: tensor {name!r} has unsupported dtype "
          f"{info['dtype'][:50]!r}; expected one of {sorted(_DTYPES)}"
        )
      dtype = _DTYPES[info["dtype"]]
      shape = tuple(info["shape"])
      begin, end = info["data_offsets"]
      if any(s < 0 for s in shape):
        raise SafetensorsError(f"{path}: tensor {name!r} has a negative dimension {shape}")
      nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
      if not 0 <= begin <= end <= data_size or end - begin != nbytes:
        raise SafetensorsError(
          f"{path}: tensor {name!r} ({info['dtype']}{list(shape)[:8]}, {nbytes} bytes) has "
          f"offsets [{begin}, {end}) inconsistent with {data_size} data bytes"
        )
      self._entries[name] = (dtype, shape, begin, end)
      spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
      if b1 < e0:
        raise SafetensorsError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    self._mm: np.memmap | None = None

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def get(self, name: str) -> np.ndarray:
    """A copy of one tensor (only its bytes are read)."""
    dtype, shape, begin, end = self._entries[name]
    if end == begin:
      return np.zeros(shape, dtype)
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    raw = self._mm[self._base + begin : self._base + end]
    if raw.size != end - begin:  # the file shrank after its header was checked
      raise SafetensorsError(f"{self.path}: tensor {name!r} is cut short; the file was truncated")
    return np.array(raw.view(dtype).reshape(shape))


def save_file(
  tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
  path: str,
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes in-memory tensors in the safetensors format."""
  items = dict(tensors.items() if isinstance(tensors, Mapping) else tensors)
  write_streaming(
    path, [(n, a.dtype, a.shape) for n, a in items.items()], lambda name: items[name], metadata
  )


def tensor_nbytes(dtype: np.dtype, shape: Sequence[int]) -> int:
  return int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize


def write_streaming(
  path: str,
  specs: Sequence[tuple[str, np.dtype, Sequence[int]]],
  produce: Callable[[str], np.ndarray],
  metadata: Mapping[str, str] | None = None,
) -> int:
  """Writes a safetensors file whose tensors are made one at a time.

  `specs` lists (name, dtype, shape) in file order, so the header is written
  first; `produce(name)` is then called once per tensor and its result must
  match its spec. Only one produced tensor is alive at a time. The file is
  fsynced, so a full disk raises here rather than later. Returns the bytes of
  tensor data written.
  """
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  for name, dtype, shape in specs:
    dt = np.dtype(dtype)
    if dt not in _NAMES:
      raise SafetensorsError(f"cannot write tensor {name!r} of dtype {dt}")
    nbytes = tensor_nbytes(dt, shape)
    header[name] = {
      "dtype": _NAMES[dt],
      "shape": [int(s) for s in shape],
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, dtype, shape in specs:
      a = produce(name)
      if np.dtype(a.dtype) != np.dtype(dtype) or tuple(a.shape) != tuple(shape):
        raise SafetensorsError(
          f"{path}: tensor {name!r} came out {np.dtype(a.dtype)}{list(a.shape)}, "
          f"declared {np.dtype(dtype)}{list(shape)}"
        )
      if a.size:
        f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
      del a
    f.flush()
    os.fsync(f.fileno())
  return offset
