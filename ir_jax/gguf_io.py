"""A validating GGUF reader (memory-mapped), in place of `gguf.GGUFReader` for files we import.

`gguf.GGUFReader` trusts the counts a file declares: an array of 2**62 numbers
in a 100-byte file makes it loop forever (reads past the end return empty
arrays), and it builds one numpy view per array element (~1 KB each). Here
every count, length and tensor span is checked against the bytes left before
anything is read or allocated, arrays become one numpy array each, and tensor
data stays in the memory map. Fields and tensors look like GGUFReader's where
our code uses them (`fields[k].contents()`, `tensors[i].name/.shape/
.tensor_type/.data`), so `ir_jax.tokenizer` takes either.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# An array longer than this is no tokenizer (4 x the largest vocabulary
# ir_jax.config accepts); it bounds what a hostile file can make us build.
MAX_ARRAY = 1 << 24
MAX_NESTING = 4  # arrays of arrays of ...
MAX_KEY = 65_535  # the GGUF spec's limit on key length

# GGUFValueType -> little-endian numpy dtype, for the fixed-size types.
_SCALARS = {
  0: "<u1",
  1: "<i1",
  2: "<u2",
  3: "<i2",
  4: "<u4",
  5: "<i4",
  6: "<f4",
  7: "?",
  10: "<u8",
  11: "<i8",
  12: "<f8",
}
_STRING, _ARRAY = 8, 9
_FLOAT_TENSORS = {
  GGMLQuantizationType.F32: np.float32,
  GGMLQuantizationType.F16: np.float16,
  GGMLQuantizationType.F64: np.float64,
  GGMLQuantizationType.I8: np.int8,
  GGMLQuantizationType.I16: np.int16,
  GGMLQuantizationType.I32: np.int32,
  GGMLQuantizationType.I64: np.int64,
}


class GGUFError(ValueError):
  """A GGUF file is truncated, malformed or declares impossible sizes."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One metadata value: a Python scalar, a str, a numpy array or a list (of str / of arrays)."""

  name: str
  value: Any
  type: int  # GGUFValueType of the value (of the items, for arrays: see item_type)
  item_type: int | None = None

  def contents(self) -> Any:
    """As GGUFReader's `ReaderField.contents()`: Python values, arrays as lists."""
    if self.item_type == _STRING and self.type == _ARRAY:
      return list(self.value)  # already Python strings
    return _to_python(self.value)


def _to_python(v: Any) -> Any:
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, list):
    return [_to_python(x) for x in v]
  return v


@dataclasses.dataclass(frozen=True)
class Tensor:
  name: str
  tensor_type: GGMLQuantizationType
  shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
  n_elements: int
  n_bytes: int
  data_offset: int
  data: np.ndarray  # a read-only view into the memory map (bytes for quantized types)


class _Cursor:
  """Reads little-endian values from a buffer, refusing any read past its end."""

  def __init__(self, buf: Any, size: int):
    self.buf, self.size, self.pos = buf, size, 0

  def need(self, n: int, what: str) -> None:
    if n > self.size - self.pos:
      raise GGUFError(
        f"truncated or corrupt in {what}: needs {n} bytes at offset {self.pos}, "
        f"the file has {self.size - self.pos} left"
      )

  def scalar(self, fmt: str, what: str) -> Any:
    n = struct.calcsize(fmt)
    self.need(n, what)
    (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
    self.pos += n
    return v

  def string(self, what: str, limit: int | None = None) -> str:
    n = self.scalar("Q", what)
    if limit is not None and n > limit:
      raise GGUFError(f"{what}: a string of {n} bytes (at most {limit} allowed)")
    self.need(n, what)
    raw = bytes(self.buf[self.pos : self.pos + n])
    self.pos += n
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      raise GGUFError(f"{what}: a string that is not UTF-8 at offset {self.pos - n}") from None

  def array(self, dtype: str, count: int, what: str) -> np.ndarray:
    dt = np.dtype(dtype)
    self.need(count * dt.itemsize, what)
    a = np.frombuffer(self.buf, dt, count, offset=self.pos).copy()
    self.pos += count * dt.itemsize
    return a


def _value(c: _Cursor, vtype: int, what: str, depth: int = 0) -> tuple[Any, int | None]:
  """One value of GGUFValueType `vtype`; returns (value, item type for arrays)."""
  if vtype in _SCALARS:
    v = c.array(_SCALARS[vtype], 1, what)[0]
    return v.item(), None
  if vtype == _STRING:
    return c.string(what), None
  if vtype != _ARRAY:
    raise GGUFError(f"{what}: unknown value type {vtype}")
  if depth >= MAX_NESTING:
    raise GGUFError(f"{what}: arrays nested deeper than {MAX_NESTING}")
  itype = c.scalar("I", what)
  count = c.scalar("Q", what)
  if count > MAX_ARRAY:
    raise GGUFError(f"{what}: an array of {count} items (at most {MAX_ARRAY} allowed)")
  if itype in _SCALARS:
    return c.array(_SCALARS[itype], count, what), itype
  if itype not in (_STRING, _ARRAY):
    raise GGUFError(f"{what}: unknown array item type {itype}")
  # Every string or array item takes at least 8 bytes: refuse a count the file cannot hold.
  c.need(count * 8, what)
  return [_value(c, itype, what, depth + 1)[0] for _ in range(count)], itype


class GGUFFile:
  """The metadata and tensors of one GGUF file, validated against its size."""

  def __init__(self, path: str | os.PathLike[str]):
    self.path = os.fspath(path)
    try:
      size = os.path.getsize(self.path)
      f = open(self.path, "rb")
    except OSError as e:
      raise FileNotFoundError(f"{self.path}: cannot open GGUF file ({e.strerror})") from None
    with f:
      if size < 24:
        raise GGUFError(f"{size} bytes is too short for a GGUF header (24)")
      buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    self.fields: dict[str, Field] = {}
    self.tensors: list[Tensor] = []
    c = _Cursor(buf, size)
    if bytes(buf[:4]) != MAGIC:
      raise GGUFError(f"bad magic {bytes(buf[:4])!r} (expected {MAGIC!r})")
    c.pos = 4
    version = c.scalar("I", "the header")
    if version not in VERSIONS:
      hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
      raise GGUFError(f"GGUF version {version}{hint}; this reader supports {VERSIONS}")
    n_tensors = c.scalar("Q", "the header")
    n_kv = c.scalar("Q", "the header")
    # Each key/value takes >= 13 bytes and each tensor info >= 24.
    if n_kv * 13 + n_tensors * 24 > size - c.pos:
      raise GGUFError(
        f"the header declares {n_kv} metadata keys and {n_tensors} tensors, more "
        f"than its {size} bytes can hold (truncated or corrupt)"
      )
    for k in range(n_kv):
      key = c.string(f"metadata key {k}", MAX_KEY)
      what = f"metadata {key!r}"
      vtype = c.scalar("I", what)
      value, itype = _value(c, vtype, what)
      if key in self.fields:
        raise GGUFError(f"metadata key {key!r} appears twice")
      self.fields[key] = Field(key, value, vtype, itype)
    infos = []
    for k in range(n_tensors):
      name = c.string(f"tensor info {k}", MAX_KEY)
      what = f"tensor info {name!r}"
      n_dims = c.scalar("I", what)
      if n_dims > MAX_DIMS:
        raise GGUFError(f"{what}: {n_dims} dimensions (at most {MAX_DIMS})")
      dims = tuple(int(d) for d in c.array("<u8", n_dims, what))
      raw_type = c.scalar("I", what)
      offset = c.scalar("Q", what)
      infos.append((name, dims, raw_type, offset))
    align = self.fields.get("general.alignment")
    alignment = DEFAULT_ALIGNMENT
    if align is not None:
      alignment = align.value
      if align.type != 4 or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment must be a uint32 power of two, got {alignment!r}")
    self.data_offset = c.pos + (-c.pos % alignment)
    self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
    seen: dict[str, None] = {}
    spans = []
    for name, dims, raw_type, offset in infos:
      what = f"tensor {name!r}"
      if name in seen:
        raise GGUFError(f"{what} appears twice")
      seen[name] = None
      try:
        ttype = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[ttype]
      except (ValueError, KeyError):
        raise GGUFError(f"{what}: unknown tensor type {raw_type}") from None
      n_elements = int(np.prod(dims, dtype=object)) if dims else 1
      if dims and dims[0] % block:
        raise GGUFError(
          f"{what}: first dimension {dims[0]} is not a multiple of the "
          f"{ttype.name} block size {block}"
        )
      n_bytes = n_elements * type_size // block
      begin = self.data_offset + offset
      if begin + n_bytes > size:
        raise GGUFError(
          f"{what} ({ttype.name}{list(dims)}, {n_bytes} bytes at offset {begin}) "
          f"runs past the end of the {size}-byte file (truncated or corrupt)"
        )
      spans.append((begin, begin + n_bytes, name))
      np_dims = tuple(reversed(dims))
      raw = self.data[begin : begin + n_bytes]
      if ttype in _FLOAT_TENSORS:
        data = raw.view(_FLOAT_TENSORS[ttype]).reshape(np_dims)
      else:
        data = raw.reshape(quant_shape_to_byte_shape(np_dims, ttype))
      self.tensors.append(Tensor(name, ttype, dims, n_elements, n_bytes, begin, data))
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
      if b1 < e0:
        raise GGUFError(f"tensors {n0!r} and {n1!r} overlap")
