"""Local text files -> documents: globs, record splitting, decoding policy, split by hash.

Pure Python, no TFDS: the builder in `builder.py` streams what this yields.
A document is a record's text with surrounding whitespace stripped; records
that are then empty are skipped and counted, never written.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ir_jax.data.config import DataConfig, DataError, FileSpec
from ir_jax.progress import Progress
from ir_jax.text import DECLARED_ENCODINGS, decode_replacing

REPO_ROOT = Path(__file__).resolve().parents[2]
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TRAIN, VALIDATION = "train", "validation"
_FINGERPRINT_BYTES = 1 << 16  # head and tail bytes hashed per file for the dataset name


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """A resolved input file with its effective reading options."""

  path: Path  # where to read it on this machine
  display: str  # as the config spells it (relative paths stay relative): names it everywhere
  domain: str  # '' for JSONL without an explicit domain: taken per line, else 'jsonl'
  split_mode: str  # file | blank_lines | lines | jsonl
  encoding: str  # '' -> UTF-8 with the declared-encoding fallback

  def to_json(self) -> dict[str, str]:
    return {
      "path": self.display,
      "domain": self.domain,
      "split_mode": self.split_mode,
      "encoding": self.encoding,
    }


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  domain: str
  source: str  # "path:line" of the record's first line


class Stats:
  """Counts of what was read and skipped; printed after preparing and kept in the metadata."""

  def __init__(self) -> None:
    self.counts: Counter[str] = Counter()
    self.docs_by_split_domain: Counter[str] = Counter()
    self.examples: dict[str, str] = {}  # first occurrence of each skip kind

  def skip(self, kind: str, where: str, n: int = 1) -> None:
    self.counts[kind] += n
    self.examples.setdefault(kind, where)

  def to_json(self) -> dict[str, Any]:
    return {
      "counts": dict(sorted(self.counts.items())),
      "documents": dict(sorted(self.docs_by_split_domain.items())),
      "first_skip": dict(sorted(self.examples.items())),
    }

  def summary(self) -> str:
    c = self.counts
    lines = [
      f"{c['files']} files, {c['bytes'] / 1e6:.2f} MB, {c['documents']} documents "
      f"({c['documents_train']} train, {c['documents_validation']} validation)"
    ]
    domains = sorted({k.split("/", 1)[1] for k in self.docs_by_split_domain})
    for d in domains:
      tr = self.docs_by_split_domain[f"{TRAIN}/{d}"]
      va = self.docs_by_split_domain[f"{VALIDATION}/{d}"]
      lines.append(f"  domain {d!r}: {tr} train, {va} validation")
    skips = {k: v for k, v in c.items() if k.startswith("skipped_") or k == "replaced_bytes"}
    for k, v in sorted(skips.items()):
      lines.append(f"  {k.replace('_', ' ')}: {v} (first: {self.examples.get(k, '?')})")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Files


def _matches(pattern: str, base: Path) -> list[Path]:
  full = pattern if os.path.isabs(pattern) else str(base / pattern)
  return sorted(Path(p) for p in glob.glob(full, recursive=True))


def resolve_files(
  cfg: DataConfig, base_dir: str | os.PathLike[str] | None = None
) -> list[SourceFile]:
  """Expand `cfg.files` globs into SourceFiles, sorted within each entry.

  Relative patterns are looked up under `base_dir` (default: the current
  directory), then under the repository root, where configs/ writes them from.
  """
  bases = [Path(base_dir) if base_dir is not None else Path.cwd()]
  if REPO_ROOT not in bases:
    bases.append(REPO_ROOT)
  out: list[SourceFile] = []
  seen: dict[Path, int] = {}
  for i, spec in enumerate(cfg.files):
    paths: list[Path] = []
    for base in bases:
      paths = _matches(os.path.expanduser(spec.path), base)
      if paths:
        break
    if not paths:
      where = " or ".join(str(b) for b in bases)
      raise DataError(
        f"data.files[{i}] {spec.path!r} matches no file (looked under {where}); "
        "fix the path, or fetch the demo text with `bash launch/fetch_assets.sh`"
      )
    for p in paths:
      if p.is_dir():
        raise DataError(
          f"data.files[{i}] {spec.path!r} matches directory {p}; "
          "use a glob for its files, e.g. 'DIR/*.txt'"
        )
      key = p.resolve()
      if key in seen:
        raise DataError(
          f"file {p} is listed twice (data.files[{seen[key]}] and [{i}]); list every file once"
        )
      seen[key] = i
      out.append(_source_file(spec, p, base, cfg))
  return out


def _source_file(spec: FileSpec, path: Path, base: Path, cfg: DataConfig) -> SourceFile:
  is_jsonl = path.suffix.lower() in JSONL_SUFFIXES
  mode = "jsonl" if is_jsonl else (spec.split_mode or cfg.split_mode)
  # Name the file as the config did so the dataset fingerprint does not
  # depend on where the repository is checked out.
  if os.path.isabs(spec.path):
    display = str(path)
  else:
    try:
      display = path.relative_to(base).as_posix()
    except ValueError:
      display = str(path)
  domain = spec.domain or ("" if is_jsonl else path.parent.name or "text")
  return SourceFile(
    path=path, display=display, domain=domain, split_mode=mode, encoding=spec.encoding
  )


def fingerprint(files: Sequence[SourceFile], cfg: DataConfig) -> str:
  """A short stable name for this file set and reading options (the TFDS config name).

  Hashes names, sizes and the first and last 64 KiB of every file: different
  file sets or edited files get different names without reading whole corpora.
  """
  h = hashlib.sha256()
  options = {
    k: getattr(cfg, k)
    for k in ("validation_fraction", "text_field", "domain_field", "encoding_errors", "bad_records")
  }
  h.update(json.dumps({"format": 1, "options": options}, sort_keys=True).encode())
  for f in files:
    size = f.path.stat().st_size
    h.update(json.dumps([f.to_json(), size], sort_keys=True).encode())
    with open(f.path, "rb") as fh:
      h.update(fh.read(_FINGERPRINT_BYTES))
      if size > 2 * _FINGERPRINT_BYTES:
        fh.seek(size - _FINGERPRINT_BYTES)
        h.update(fh.read())
  return f"f{len(files)}_{h.hexdigest()[:16]}"


# --------------------------------------------------------------------------
# Records and decoding


def _is_blank(line: bytes) -> bool:
  return not line.strip()


def _records(fh: BinaryIO, mode: str) -> Iterator[tuple[int, bytes]]:
  """(first line number, raw bytes) of each record; memory is bounded by one record."""
  if mode == "file":
    yield 1, fh.read()
    return
  if mode in ("lines", "jsonl"):
    for n, line in enumerate(fh, start=1):
      yield n, line
    return
  block: list[bytes] = []
  start = 1
  for n, line in enumerate(fh, start=1):
    if _is_blank(line):
      if block:
        yield start, b"".join(block)
        block = []
      continue
    if not block:
      start = n
    block.append(line)
  if block:
    yield start, b"".join(block)


def _decode(
  raw: bytes, f: SourceFile, where: str, first: bool, cfg: DataConfig, stats: Stats
) -> str | None:
  """Text of one record under the encoding policy, or None if it is skipped."""
  if f.encoding:
    try:
      return raw.decode(f.encoding)
    except (UnicodeDecodeError, LookupError) as e:
      raise DataError(
        f"{where}: cannot decode as {f.encoding!r} ({e}); fix the `encoding` "
        f"of this entry in data.files"
      ) from None
  try:
    # A byte-order mark can only start the file; it is not text.
    return raw.decode("utf-8-sig" if first else "utf-8")
  except UnicodeDecodeError as e:
    bad = e
  declared = DECLARED_ENCODINGS.get(f.path.name)
  if declared is not None:
    return raw.decode(declared)
  if cfg.encoding_errors == "replace":
    text, n_bad = decode_replacing(raw)
    stats.skip("replaced_bytes", where, n_bad)
    return text
  if cfg.encoding_errors == "skip":
    stats.skip("skipped_undecodable_records", where)
    return None
  raise DataError(
    f"{where}: not valid UTF-8 (byte 0x{raw[bad.start]:02x} at record offset {bad.start}); "
    f"declare the file's encoding in data.files (e.g. {{'path': ..., 'encoding': 'latin-1'}}) "
    f"or set data.encoding_errors to 'replace' or 'skip'"
  )


def _bad_record(where: str, what: str, kind: str, cfg: DataConfig, stats: Stats) -> None:
  if cfg.bad_records == "skip":
    stats.skip(kind, where)
    return
  raise DataError(
    f"{where}: {what}; fix the line, or set data.bad_records='skip' to skip and count such lines"
  )


def read_documents(f: SourceFile, cfg: DataConfig, stats: Stats) -> Iterator[Document]:
  """The documents of one file; skips are counted in `stats`, fatal problems raise DataError."""
  size = f.path.stat().st_size
  stats.counts["files"] += 1
  stats.counts["bytes"] += size
  if size == 0:
    stats.skip("skipped_empty_files", f.display)
    return
  before = stats.counts["documents"]
  with open(f.path, "rb") as fh:
    for line_no, raw in _records(fh, f.split_mode):
      where = f"{f.display}:{line_no}"
      if f.split_mode == "jsonl" and _is_blank(raw):
        continue  # blank lines between JSON objects carry nothing
      text = _decode(raw, f, where, line_no == 1, cfg, stats)
      if text is None:
        continue
      domain = f.domain
      if f.split_mode == "jsonl":
        try:
          obj = json.loads(text)
        except json.JSONDecodeError as e:
          _bad_record(
            where,
            f"not valid JSON ({e.msg} at column {e.colno})",
            "skipped_invalid_json",
            cfg,
            stats,
          )
          continue
        if not isinstance(obj, dict) or not isinstance(obj.get(cfg.text_field), str):
          found = (
            f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
          )
          _bad_record(
            where,
            f"expected an object with a string {cfg.text_field!r} field, found {found}",
            "skipped_missing_text",
            cfg,
            stats,
          )
          continue
        text = obj[cfg.text_field]
        if not domain:
          value = obj.get(cfg.domain_field)
          domain = value if isinstance(value, str) and value else "jsonl"
      text = text.strip()
      if not text:
        stats.skip("skipped_empty_documents", where)
        continue
      stats.counts["documents"] += 1
      yield Document(text=text, domain=domain, source=where)
  if stats.counts["documents"] == before:
    stats.skip("skipped_files_without_documents", f.display)


def split_of(text: str, validation_fraction: float) -> str:
  """'train' or 'validation', from a hash of the document text.

  Content, not position, decides: identical documents land in the same split
  (no train/validation leakage) and reordering files changes nothing.
  """
  if validation_fraction <= 0.0:
    return TRAIN
  if validation_fraction >= 1.0:
    return VALIDATION
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  return VALIDATION if u < validation_fraction else TRAIN


def scan(files: Sequence[SourceFile], cfg: DataConfig, verbose: bool = True) -> Stats:
  """Read every file once: validate, count documents per split and domain, count skips."""
  stats = Stats()
  total_kb = max(sum(f.path.stat().st_size for f in files) // 1024, 1)
  progress = Progress("  scanning", total_kb, every=2.0, unit="kB") if verbose else None
  for i, f in enumerate(files):
    for doc in read_documents(f, cfg, stats):
      split = split_of(doc.text, cfg.validation_fraction)
      stats.counts[f"documents_{split}"] += 1
      stats.docs_by_split_domain[f"{split}/{doc.domain}"] += 1
    if progress is not None:
      c = stats.counts
      done = total_kb if i == len(files) - 1 else min(c["bytes"] // 1024, total_kb - 1)
      progress(done, note=f"{c['files']}/{len(files)} files, {c['documents']} documents")
  return stats
