"""TFDS datasets without TensorFlow: a builder over local text, catalogue datasets by name.

Everything is prepared with `download_and_prepare(file_format="array_record")`
and read with `as_data_source()` (random access, Text features come back as
bytes); `as_dataset()`, tfrecord and `tfds.as_numpy` need TensorFlow and are
never used. The builder lives in this package because TFDS derives a
builder's metadata location from its module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from ir_jax.data import sources
from ir_jax.data.config import LOCAL, DataConfig, DataError
from ir_jax.data.sources import SourceFile, Stats

_PREPARE_HINT = "python -m ir_jax.data prepare --config CONFIG"


@dataclasses.dataclass(eq=False, repr=False)
class TextConfig(tfds.core.BuilderConfig):
  """A file set and its reading options; `name` is their fingerprint."""

  files: tuple[SourceFile, ...] = ()
  data: DataConfig | None = None
  verbose: bool = True

  def __repr__(self) -> str:
    return f"TextConfig({self.name!r}, {len(self.files)} files)"


class _QuietLocalBuilder(logging.Filter):
  """Drops TFDS warnings that are expected for our builder and would flood the log.

  Every file set is a "custom data configuration" by design, and a not yet
  prepared variant has "no dataset_info.json".
  """

  def filter(self, record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    if not args:
      return True
    if str(record.msg).startswith("Using custom data configuration"):
      return not isinstance(args[0], TextConfig)
    if str(record.msg).startswith("Variant folder"):
      return IrJaxText.name not in str(args[0])
    return True


class IrJaxText(tfds.core.GeneratorBasedBuilder):
  """Documents from local .txt / JSONL files, split into train/validation by content hash."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Local text: text, domain, source per document."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds a packaged builder's file through importlib_resources,
    # which current etils no longer installs; the answer is this file.
    return epath.Path(__file__)

  # TFDS announces a download of "Unknown size" here; nothing is downloaded.
  def _log_download_bytes(self) -> None:
    print(f"preparing the local text dataset in {self.data_dir} ...", flush=True)

  def _log_download_done(self) -> None:
    print(f"prepared {self.data_dir}; later runs reuse it", flush=True)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg: TextConfig = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description="Local text documents for ir_jax (see metadata.json for the file list).",
      features=tfds.features.FeaturesDict(
        {
          "text": tfds.features.Text(),
          "domain": tfds.features.Text(),
          "source": tfds.features.Text(),  # "path:line" of the record
        }
      ),
      metadata=tfds.core.MetadataDict(files=[f.to_json() for f in cfg.files] if cfg.files else []),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, str]]]]:
    del dl_manager  # nothing to download
    cfg: TextConfig = self.builder_config
    if not cfg.files or cfg.data is None:
      raise DataError(
        f"dataset {self.name}/{cfg.name} can only be read, not prepared, without "
        "its data config; prepare it with `" + _PREPARE_HINT + "`"
      )
    if cfg.verbose:
      print(f"scanning {len(cfg.files)} files ...", flush=True)
    # A first pass validates every record before anything is written and
    # tells which splits have documents (TFDS refuses to write an empty split).
    stats = sources.scan(cfg.files, cfg.data, verbose=cfg.verbose)
    if stats.counts["documents"] == 0:
      skips = {k: v for k, v in stats.counts.items() if k.startswith("skipped_")}
      raise DataError(
        f"no documents in data.files ({len(cfg.files)} files, all empty or "
        f"skipped: {skips}); check the files and data.split_mode"
      )
    self.info.metadata["stats"] = stats.to_json()
    self.info.metadata["options"] = {
      k: getattr(cfg.data, k)
      for k in (
        "split_mode",
        "validation_fraction",
        "text_field",
        "domain_field",
        "encoding_errors",
        "bad_records",
      )
    }
    self.info.metadata["domains"] = sorted({k.split("/", 1)[1] for k in stats.docs_by_split_domain})
    if cfg.verbose:
      print(stats.summary(), flush=True)
    return {
      split: self._generate_examples(split)
      for split in (sources.TRAIN, sources.VALIDATION)
      if stats.counts[f"documents_{split}"] > 0
    }

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, str]]]:
    cfg: TextConfig = self.builder_config
    assert cfg.data is not None
    stats = Stats()  # the scan already reported; these counts are discarded
    for i, f in enumerate(cfg.files):
      for doc in sources.read_documents(f, cfg.data, stats):
        if sources.split_of(doc.text, cfg.data.validation_fraction) == split:
          key = f"{i}:{doc.source.rsplit(':', 1)[1]}"
          yield key, {"text": doc.text, "domain": doc.domain, "source": doc.source}


@dataclasses.dataclass(frozen=True)
class TextSource:
  """One split of a prepared dataset: random access to (text, domain) by record index."""

  name: str  # "ir_jax_text/<fingerprint>" or a catalogue name
  split: str
  records: Sequence[dict[str, Any]]  # a TFDS array_record data source
  domains: tuple[str, ...]  # domain_ids index into this
  text_field: str
  domain_field: str | None  # None: every record has domain `domains[0]`
  path: str  # the prepared dataset's directory

  def __len__(self) -> int:
    return len(self.records)

  def document(self, index: int) -> tuple[str, str]:
    """(text, domain) of record `index`."""
    rec = self.records[index]
    text = rec[self.text_field]
    text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    if self.domain_field is None:
      return text, self.domains[0]
    dom = rec[self.domain_field]
    return text, dom.decode("utf-8") if isinstance(dom, bytes) else str(dom)


logging.getLogger("absl").addFilter(_QuietLocalBuilder())


# --------------------------------------------------------------------------
# Local text


def local_builder(
  cfg: DataConfig, base_dir: str | os.PathLike[str] | None = None, verbose: bool = True
) -> IrJaxText:
  """The builder for `cfg.files` under `cfg.data_dir` (prepared or not)."""
  files = tuple(sources.resolve_files(cfg, base_dir))
  name = sources.fingerprint(files, cfg)
  config = TextConfig(
    name=name, files=files, data=cfg, verbose=verbose, description=f"{len(files)} local text files"
  )
  return IrJaxText(config=config, data_dir=os.path.expanduser(cfg.data_dir))


def prepare(
  cfg: DataConfig, base_dir: str | os.PathLike[str] | None = None, verbose: bool = True
) -> str:
  """Prepare the dataset `cfg` names as array_record (no-op if done); return its directory."""
  if cfg.name != LOCAL:
    return _prepare_catalogue(cfg, verbose)
  builder = local_builder(cfg, base_dir, verbose)
  if builder.is_prepared():
    if verbose:
      print(f"already prepared: {builder.data_dir}", flush=True)
    return str(builder.data_dir)
  tfds.disable_progress_bar()  # TFDS's tqdm bars put escape codes in logs; ours print lines
  builder.download_and_prepare(file_format="array_record")
  return str(builder.data_dir)


# --------------------------------------------------------------------------
# Catalogue datasets


def _catalogue_builder(cfg: DataConfig) -> tfds.core.DatasetBuilder:
  if os.path.isfile(os.path.join(cfg.name, "dataset_info.json")):
    return tfds.builder_from_directory(cfg.name)
  # The text catalogue registers its builders on import; without it
  # tfds.builder("c4/en") reports the dataset as unknown.
  import tensorflow_datasets.text  # noqa: F401

  try:
    return tfds.builder(cfg.name, data_dir=os.path.expanduser(cfg.data_dir))
  except (tfds.core.registered.DatasetNotFoundError, ValueError):  # unknown or unparsable
    raise DataError(
      f"data.name {cfg.name!r} is neither 'local', a TFDS catalogue dataset nor a "
      f"prepared dataset directory; check the name (e.g. 'c4/en')"
    ) from None


def catalogue_ready(cfg: DataConfig) -> tfds.core.DatasetBuilder:
  """The builder of a prepared catalogue dataset; DataError (one line) when it is not.

  Training and evaluation never download a catalogue dataset themselves (C4 is
  hundreds of GB and needs network): it is prepared once with `ir_jax.data
  prepare` where the network is reachable, and data.data_dir points at it (a
  local folder, or a gs:// bucket mounted with gcsfuse as launch/tpu_pod.sh does).
  """
  builder = _catalogue_builder(cfg)
  if not builder.is_prepared():
    raise DataError(
      f"TFDS dataset {cfg.name!r} is not prepared under data.data_dir="
      f"{cfg.data_dir} (expected {builder.data_dir}); run `{_PREPARE_HINT}` "
      "where the network is reachable, or point data.data_dir at a copy "
      "(e.g. a gcsfuse-mounted bucket)"
    )
  return builder


def _prepare_catalogue(cfg: DataConfig, verbose: bool) -> str:
  builder = _catalogue_builder(cfg)
  if not builder.is_prepared():
    # Needs network and whatever the dataset's own generator needs.
    builder.download_and_prepare(file_format="array_record")
  elif verbose:
    print(f"already prepared: {builder.data_dir}", flush=True)
  return str(builder.data_dir)


# --------------------------------------------------------------------------
# Reading


def open_split(
  cfg: DataConfig,
  split: str,
  base_dir: str | os.PathLike[str] | None = None,
  prepare_if_missing: bool = False,
) -> TextSource:
  """Random access to one split of the dataset `cfg` names, prepared as array_record.

  `prepare_if_missing` prepares the local text dataset (seconds); a catalogue
  dataset is never downloaded here (`catalogue_ready`). Raises DataError if it is
  not prepared (naming the prepare command), was
  prepared in a format that needs TensorFlow, or lacks the split or field.
  """
  if cfg.name == LOCAL:
    builder: tfds.core.DatasetBuilder = local_builder(cfg, base_dir, verbose=prepare_if_missing)
    if not builder.is_prepared():
      if not prepare_if_missing:
        raise DataError(
          f"the local text dataset for data.files is not prepared (expected "
          f"{builder.data_dir}); run `{_PREPARE_HINT}`"
        )
      tfds.disable_progress_bar()  # TFDS's tqdm bars put escape codes in logs; ours print lines
      builder.download_and_prepare(file_format="array_record")
    text_field = "text"
  else:
    builder = catalogue_ready(cfg)
    text_field = cfg.text_field
  info = builder.info
  fmt = getattr(info, "file_format", None)
  fmt = str(getattr(fmt, "value", fmt) or "")
  if fmt != "array_record":
    raise DataError(
      f"{builder.data_dir} was prepared as {fmt or 'unknown format'}, which needs "
      "TensorFlow to read; prepare it again with file_format='array_record' "
      f"(`{_PREPARE_HINT}`)"
    )
  if split.split("[", 1)[0] not in info.splits:
    raise DataError(
      f"{builder.data_dir} has no split {split!r} (it has {sorted(info.splits)}); "
      "a local split is absent when no document hashed into it: change "
      "data.validation_fraction or data.train_split/eval_split"
    )
  features = info.features
  if text_field not in features:
    raise DataError(
      f"{cfg.name!r} has no text field {text_field!r} (features: "
      f"{sorted(features)}); set data.text_field"
    )
  # Our local datasets list their domains in the metadata and store one per
  # record; a catalogue dataset is one domain, named after it.
  listed = tuple((info.metadata or {}).get("domains", ()))
  domain_field: str | None = "domain" if listed and "domain" in features else None
  domains = listed if domain_field else (builder.name,)
  config_name = builder.builder_config.name if builder.builder_config else ""
  if not config_name:
    config_name = str(getattr(info, "config_name", "") or "")
  return TextSource(
    name=f"{builder.name}/{config_name}" if config_name else builder.name,
    split=split,
    records=builder.as_data_source(split=split),
    domains=domains,
    text_field=text_field,
    domain_field=domain_field,
    path=str(builder.data_dir),
  )


def read_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
  """The stats a local prepare stored in `<dataset dir>/metadata.json` ({} if none)."""
  p = Path(path) / "metadata.json"
  return json.loads(p.read_text()).get("stats", {}) if p.is_file() else {}
