"""Text data for ir_jax: TFDS (array_record, no TensorFlow) -> tokens -> packed global batches.

    from ir_jax.data import from_config, prepare, train_iterator
    dcfg = from_config(cfg)             # cfg.data of a configs/*.py ConfigDict
    prepare(dcfg)                       # once: local files -> array_record under data_dir
    it = train_iterator(dcfg, mesh=mesh, batch_axes="data")
    batch = next(it)                    # dict of [B, T] global arrays, see packing.py
    state = it.get_state()              # JSON-able; it.set_state(state) resumes exactly

`python -m ir_jax.data --help` prepares and inspects datasets from a config.
"""

from ir_jax.data.builder import IrJaxText, TextSource, open_split, prepare
from ir_jax.data.config import DataConfig, DataError, FileSpec, data_config, from_config
from ir_jax.data.packing import PAD_ROW_FIELDS, ROW_FIELDS, finish_rows
from ir_jax.data.pipeline import (
  DataIterator,
  batch_sharding,
  eval_iterator,
  make_iterator,
  train_iterator,
)
from ir_jax.data.tokenize import TextTokenizer, byte_tokenizer, load_text_tokenizer

__all__ = [
  "DataConfig",
  "DataError",
  "DataIterator",
  "FileSpec",
  "IrJaxText",
  "PAD_ROW_FIELDS",
  "ROW_FIELDS",
  "TextSource",
  "TextTokenizer",
  "batch_sharding",
  "byte_tokenizer",
  "data_config",
  "eval_iterator",
  "finish_rows",
  "from_config",
  "load_text_tokenizer",
  "make_iterator",
  "open_split",
  "prepare",
  "train_iterator",
]
