"""The `data` section of a config: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ir_jax.base_error import IrJaxError
from ir_jax.config import ConfigError, refuse_remote

LOCAL = "local"  # data.name for the local-text builder over data.files
SPLIT_MODES = ("file", "blank_lines", "lines")
DOCUMENTS, DOMAINS = "documents", "domains"  # data.train_mix
ENCODING_ERRORS = ("strict", "replace", "skip")
BAD_RECORDS = ("error", "skip")
BYTE_TOKENIZER = "byte"  # data.tokenizer for the built-in 257-token byte tokenizer


class DataError(IrJaxError, ValueError):
  """Input data is missing, unprepared or malformed in a way the user must fix."""


@dataclasses.dataclass(frozen=True)
class FileSpec:
  """One entry of `data.files`: a path or glob plus per-entry overrides ('' = default)."""

  path: str
  domain: str = ""  # '' -> the JSONL domain field, else the file's parent directory name
  split_mode: str = ""  # '' -> DataConfig.split_mode (ignored for JSONL)
  encoding: str = ""  # '' -> UTF-8, or the encoding ir_jax.assets declares for the file name


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from, how it is tokenized, packed and batched.

  `name` is "local" for the builder over `files`, a TFDS catalogue name
  ("c4/en", "wikipedia/20230601.en") prepared as array_record under
  `data_dir`, or the path of a prepared TFDS dataset version directory.
  """

  name: str = LOCAL
  files: tuple[FileSpec, ...] = ()
  tokenizer: str = ""  # tokenizer.json, model dir, .gguf, "byte"; '' -> model.checkpoint
  seq_len: int = 512
  batch_size: int = 8  # global rows per batch, over all processes
  data_dir: str = "runs/tfds"
  split_mode: str = "file"  # .txt files: one document per file, per blank-line block, per line
  validation_fraction: float = 0.05
  seed: int = 0
  add_bos: bool | None = None  # None: as the tokenizer's own post-processor does
  add_eos: bool | None = None
  text_field: str = "text"
  domain_field: str = "domain"
  train_split: str = "train"
  eval_split: str = "validation"
  encoding_errors: str = "strict"  # undecodable bytes: raise, replace (counted), skip record
  bad_records: str = "error"  # JSONL line that is not an object with a string text field
  prefetch: int = 2  # local batches prepared ahead in a background thread (0: none)
  # The training split's packed stream: "documents" (every document once per
  # epoch, shuffled) or "domains" (documents cut into pieces of at most
  # piece_chars characters, drawn with equal weight per domain).
  train_mix: str = DOCUMENTS
  piece_chars: int = 2000

  def __post_init__(self) -> None:
    files = tuple(
      f if isinstance(f, FileSpec) else _file_spec(f, i) for i, f in enumerate(self.files)
    )
    object.__setattr__(self, "files", files)
    self.validate()

  def validate(self) -> None:
    """Raises ConfigError naming the field, the value and what is expected."""
    refuse_remote("data.data_dir", self.data_dir)
    refuse_remote("data.tokenizer", self.tokenizer)
    for i, f in enumerate(self.files):
      refuse_remote(f"data.files[{i}]", getattr(f, "path", f))

    def integer(name: str, low: int) -> None:
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"data.{name} must be an integer >= {low}, got {v!r}")

    def choice(name: str, options: tuple[str, ...], value: Any = None) -> None:
      v = getattr(self, name) if value is None else value
      if v not in options:
        raise ConfigError(f"data.{name} must be one of {list(options)}, got {v!r}")

    if not isinstance(self.name, str) or not self.name:
      raise ConfigError(f"data.name must be 'local' or a TFDS dataset name, got {self.name!r}")
    if self.name == LOCAL and not self.files:
      raise ConfigError(
        "data.name is 'local' but data.files is empty; list text/JSONL files "
        "or globs, e.g. ('assets/text/news/*.cor',)"
      )
    if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 2:
      raise ConfigError(
        f"data.seq_len must be an integer >= 2 (a row needs an input and its "
        f"next-token target), got {self.seq_len!r}"
      )
    integer("batch_size", 1)
    integer("seed", 0)
    if self.seed >= 2**32:
      raise ConfigError(f"data.seed must be below 2**32 (grain's shuffle seed), got {self.seed}")
    integer("prefetch", 0)
    choice("split_mode", SPLIT_MODES)
    choice("train_mix", (DOCUMENTS, DOMAINS))
    integer("piece_chars", 64)
    choice("encoding_errors", ENCODING_ERRORS)
    choice("bad_records", BAD_RECORDS)
    for i, f in enumerate(self.files):
      if f.split_mode:
        if f.split_mode not in SPLIT_MODES:
          raise ConfigError(
            f"data.files[{i}].split_mode must be one of {list(SPLIT_MODES)}, got {f.split_mode!r}"
          )
    vf = self.validation_fraction
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 <= vf <= 1.0:
      raise ConfigError(f"data.validation_fraction must be a number in [0, 1], got {vf!r}")
    for name in ("add_bos", "add_eos"):
      if getattr(self, name) not in (None, True, False):
        raise ConfigError(f"data.{name} must be None, True or False, got {getattr(self, name)!r}")
    for name in (
      "tokenizer",
      "data_dir",
      "text_field",
      "domain_field",
      "train_split",
      "eval_split",
    ):
      if not isinstance(getattr(self, name), str):
        raise ConfigError(f"data.{name} must be a string, got {getattr(self, name)!r}")
    if not self.data_dir:
      raise ConfigError("data.data_dir must name a directory for prepared datasets, got ''")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _file_spec(entry: Any, i: int) -> FileSpec:
  if isinstance(entry, str):
    return FileSpec(path=entry)
  if isinstance(entry, Mapping):
    d = dict(entry)
    known = {f.name for f in dataclasses.fields(FileSpec)}
    unknown = sorted(set(d) - known)
    if unknown or "path" not in d:
      raise ConfigError(
        f"data.files[{i}] must be a path string or a dict with keys "
        f"{sorted(known)} ('path' required), got {entry!r}"
      )
    for k, v in d.items():
      if not isinstance(v, str):
        raise ConfigError(f"data.files[{i}].{k} must be a string, got {v!r}")
    return FileSpec(**d)
  raise ConfigError(f"data.files[{i}] must be a path string or a dict, got {entry!r}")


def data_config(data_cfg: Any, model_checkpoint: str = "") -> DataConfig:
  """From the `data` section of a ConfigDict (or a plain mapping); unknown keys are an error.

  An empty `tokenizer` falls back to `model_checkpoint` (checkpoints, HF
  directories and GGUF files all carry a tokenizer).
  """
  d = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  names = {f.name for f in dataclasses.fields(DataConfig)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ConfigError(f"unknown data config fields {unknown}; known: {sorted(names)}")
  if isinstance(d.get("files"), str):
    d["files"] = (d["files"],)  # one glob is a common spelling of a list of one
  d["files"] = tuple(d.get("files") or ())
  if not d.get("tokenizer") and model_checkpoint:
    d["tokenizer"] = model_checkpoint
  return DataConfig(**d)


def from_config(cfg: Any) -> DataConfig:
  """`cfg.data` of a whole config as a DataConfig (tokenizer defaults to model.checkpoint)."""
  if "data" not in cfg:
    raise ConfigError(
      "the config has no `data` section; add cfg.data = ConfigDict(...) (see configs/tiny.py)"
    )
  ckpt = ""
  if "model" in cfg and "checkpoint" in cfg.model:
    ckpt = cfg.model.checkpoint or ""
  return data_config(cfg.data, ckpt)
