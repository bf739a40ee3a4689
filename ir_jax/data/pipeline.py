"""The input pipeline: data source -> shard -> shuffle -> tokenize -> pack -> global batches.

grain's MapDataset gives a deterministic, random-access document stream
(per-process shard, seeded shuffle reseeded every epoch, repeat); packing
walks it with a two-integer cursor; batches become global `jax.Array`s on
the caller's mesh. `DataIterator.get_state()` is a small JSON-able dict for
this process (store one per process; `grain.checkpoint.CheckpointSave`
does exactly that with orbax) and `set_state()` continues exactly there.
"""

from __future__ import annotations

import atexit
import math
import os
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ir_jax.data.builder import TextSource, open_split
from ir_jax.data.config import DOCUMENTS, DOMAINS, DataConfig, DataError
from ir_jax.data.packing import PACK, PAD, TokenBatches, empty_batch
from ir_jax.data.tokenize import TextTokenizer, load_text_tokenizer

STATE_FORMAT = "ir_jax.data/1"


class _Tokenize:
  """Record index -> {tokens, doc_id, domain_id}; runs inside the grain map. With
  `max_tokens` > 0 a document keeps only its first `max_tokens` tokens."""

  def __init__(self, source: TextSource, tokenizer: TextTokenizer, max_tokens: int = 0) -> None:
    self.source, self.tokenizer, self.max_tokens = source, tokenizer, max_tokens
    self.domain_ids = {d: i for i, d in enumerate(source.domains)}

  def __call__(self, index: int) -> dict[str, Any]:
    text, domain = self.source.document(int(index))
    tokens = self.tokenizer.encode(text)
    return {
      "tokens": tokens[: self.max_tokens] if self.max_tokens > 0 else tokens,
      "doc_id": int(index),
      "domain_id": self.domain_ids.get(domain, -1),
    }


def text_pieces(text: str, size: int) -> list[tuple[int, int]]:
  """Character ranges cutting `text` into pieces of at most `size` characters.

  A cut goes at the last line break in the second half of the window, else
  the last space there, else at `size`; pieces that are only whitespace are
  dropped. The ranges cover the text in order.
  """
  out: list[tuple[int, int]] = []
  a, n = 0, len(text)
  while a < n:
    b = min(a + size, n)
    if b < n:
      lo = a + size // 2
      cut = text.rfind("\n", lo, b)
      if cut < 0:
        cut = text.rfind(" ", lo, b)
      if cut > a:
        b = cut
    if text[a:b].strip():
      out.append((a, b))
    a = b
  return out


class _TokenizePiece:
  """Epoch position -> {tokens, doc_id, domain_id} of one piece of a document."""

  def __init__(self, source: TextSource, tokenizer: TextTokenizer, table: np.ndarray) -> None:
    self.source, self.tokenizer, self.table = source, tokenizer, table
    self.domain_ids = {d: i for i, d in enumerate(source.domains)}

  def __call__(self, position: int) -> dict[str, Any]:
    piece, record, start, end = (int(v) for v in self.table[int(position)])
    text, domain = self.source.document(record)
    return {
      "tokens": self.tokenizer.encode(text[start:end].strip()),
      "doc_id": piece,
      "domain_id": self.domain_ids.get(domain, -1),
    }


def domain_table(
  source: TextSource, piece_chars: int, process_index: int, process_count: int
) -> np.ndarray:
  """One domain-balanced epoch of this process's records: rows (piece, record, start, end).

  Every record of this process's shard is cut into pieces of at most
  `piece_chars` characters (`text_pieces`); each domain's pieces are cycled
  to the length of the largest domain's, and the domains interleaved round-robin,
  so any run of D consecutive rows holds one piece of each of the D domains
  and every piece appears at least once per epoch.
  """
  by_domain: dict[str, list[tuple[int, int, int, int]]] = {}
  piece = 0
  for record in range(process_index, len(source), process_count):
    text, domain = source.document(record)
    for start, end in text_pieces(text, piece_chars):
      by_domain.setdefault(domain, []).append((piece, record, start, end))
      piece += 1
  if not by_domain:
    raise DataError(f"split {source.split!r} of {source.name} has no text for this process")
  length = max(len(v) for v in by_domain.values())
  cols = [np.resize(np.asarray(by_domain[d], np.int64), (length, 4)) for d in sorted(by_domain)]
  return np.stack(cols, axis=1).reshape(-1, 4)  # round-robin: row i*D + d is domain d


def document_stream(
  source: TextSource,
  tokenizer: TextTokenizer,
  *,
  seed: int,
  shuffle: bool,
  num_epochs: int | None,
  process_index: int,
  process_count: int,
  mix: str = DOCUMENTS,
  piece_chars: int = 0,
  max_doc_tokens: int = 0,
) -> grain.MapDataset:
  """This process's tokenized documents, in order: every process_count-th record, shuffled.

  max_doc_tokens > 0 keeps only each document's first `max_doc_tokens` tokens (an
  evaluation then rests on many documents, not on the few longest).

  mix="domains": instead of whole documents, pieces of at most `piece_chars`
  characters drawn with equal weight per domain (`domain_table`), so a few
  long documents or one large domain cannot fill the batches a fit sees.
  """
  n = len(source)
  if n < process_count:
    raise DataError(
      f"split {source.split!r} of {source.name} has {n} documents, fewer than the "
      f"{process_count} processes reading it; use more data or fewer processes"
    )
  if mix == DOMAINS:
    table = domain_table(source, piece_chars, process_index, process_count)
    ds = grain.MapDataset.range(len(table))
    fn: Any = _TokenizePiece(source, tokenizer, table)
  else:
    ds = grain.MapDataset.range(n)[process_index::process_count]
    fn = _Tokenize(source, tokenizer, max_doc_tokens)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # grain reseeds the permutation every epoch of a repeat
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  return ds.map(fn)


def batch_sharding(mesh: Mesh, batch_axes: str | Sequence[str], ndim: int) -> NamedSharding:
  """Rows split over `batch_axes` of `mesh`, other dims replicated."""
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  first = axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


class DataIterator(grain.DatasetIterator):
  """Batches of this process's rows, as global arrays on `mesh` (numpy if mesh is None).

  Every batch is a dict of the fields in `ir_jax.data.packing` with global
  batch dimension `batch_size`. Iteration ends after `num_epochs` (never if
  None); the last batch is completed with padding rows. With `num_batches`
  it ends after exactly that many batches, padding rows only once the data
  is used up: processes whose shards differ in size then still take the
  same number of steps (a collective waiting on a finished process hangs).
  """

  def __init__(
    self,
    source: TextSource,
    tokenizer: TextTokenizer,
    *,
    seq_len: int,
    batch_size: int,
    mode: str = PACK,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    mesh: Mesh | None = None,
    batch_axes: str | Sequence[str] = "data",
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 0,
    num_batches: int | None = None,
    mix: str = DOCUMENTS,
    piece_chars: int = 0,
    max_doc_tokens: int = 0,
  ) -> None:
    super().__init__()
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if mode not in (PACK, PAD):
      raise DataError(f"mode must be {PACK!r} (training) or {PAD!r} (evaluation), got {mode!r}")
    if seq_len < 2:
      raise DataError(f"seq_len must be >= 2 (a row needs an input and its target), got {seq_len}")
    if not 0 <= pi < pc:
      raise DataError(f"process_index must be in [0, {pc}), got {pi}")
    if batch_size % pc:
      raise DataError(
        f"batch size {batch_size} is not divisible by the {pc} processes; "
        "make data.batch_size a multiple of the process count"
      )
    if num_epochs is not None and num_epochs < 1:
      raise DataError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    if num_batches is not None and num_batches < 0:
      raise DataError(f"num_batches must be None or >= 0, got {num_batches}")
    if max_doc_tokens < 0 or (max_doc_tokens and mix != DOCUMENTS):
      raise DataError(
        f"max_doc_tokens must be >= 0 (0: whole documents) and applies to mix "
        f"{DOCUMENTS!r} only, got {max_doc_tokens} with mix {mix!r}"
      )
    if mix not in (DOCUMENTS, DOMAINS):
      raise DataError(f"mix must be {DOCUMENTS!r} or {DOMAINS!r}, got {mix!r}")
    if mix == DOMAINS and (mode != PACK or piece_chars < 1):
      raise DataError(
        f"mix {DOMAINS!r} packs pieces of documents: it needs mode {PACK!r} and "
        f"piece_chars >= 1, got mode {mode!r} and piece_chars {piece_chars}"
      )
    if mesh is not None:
      axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
      missing = [a for a in axes if a not in mesh.axis_names]
      if missing:
        raise DataError(f"batch axes {missing} are not axes of the mesh {mesh.axis_names}")
      shards = math.prod(mesh.shape[a] for a in axes)
      if batch_size % shards:
        raise DataError(
          f"batch size {batch_size} is not divisible by the {shards} shards of "
          f"mesh axes {axes}; make data.batch_size a multiple of {shards}"
        )
    self.source, self.tokenizer, self.mesh = source, tokenizer, mesh
    self.batch_axes, self.batch_size, self.seq_len = batch_axes, batch_size, seq_len
    self.local_batch_size = batch_size // pc
    self.domains = source.domains
    self.mode, self.num_batches = mode, num_batches
    self._docs = document_stream(
      source,
      tokenizer,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      process_index=pi,
      process_count=pc,
      mix=mix,
      piece_chars=piece_chars,
      max_doc_tokens=max_doc_tokens,
    )
    # All that must match between saving and restoring a state: anything else
    # would silently continue a different stream.
    self._layout = {
      "dataset": source.name,
      "split": source.split,
      "mode": mode,
      "seq_len": seq_len,
      "batch_size": batch_size,
      "seed": seed,
      "shuffle": shuffle,
      "num_epochs": num_epochs,
      "process_index": pi,
      "process_count": pc,
      "num_documents": len(source),
      "num_batches": num_batches,
    }
    if mix != DOCUMENTS:  # only when set: states saved before the option still restore
      self._layout.update(mix=mix, piece_chars=piece_chars)
    if max_doc_tokens:
      self._layout.update(max_doc_tokens=max_doc_tokens)
    batches: grain.IterDataset = TokenBatches(self._docs, seq_len, self.local_batch_size, mode)
    if prefetch > 0:
      batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
    self._inner: grain.DatasetIterator | None = iter(batches)
    self._batches = 0
    _LIVE.add(self)

  @property
  def documents_per_epoch(self) -> int:
    """Documents in this process's shard (one epoch)."""
    n, pc, pi = len(self.source), self._layout["process_count"], self._layout["process_index"]
    return len(range(pi, n, pc))

  def local_batch_count(self) -> int:
    """Batches this process's shard yields (tokenizes the shard once more; finite epochs only).

    Take the maximum over processes (e.g. `multihost_utils.process_allgather`)
    as `num_batches` for an evaluation every process steps through together.
    """
    if self._layout["num_epochs"] is None:
      raise DataError("an iterator that repeats forever has no batch count; set num_epochs")
    it = iter(TokenBatches(self._docs, self.seq_len, self.local_batch_size, self.mode))
    return sum(1 for _ in it)

  def next_local(self) -> dict[str, np.ndarray]:
    """The next batch as this process's numpy rows `[batch_size / process_count, ...]`."""
    inner = self._open()
    if self.num_batches is not None and self._batches >= self.num_batches:
      raise StopIteration
    try:
      batch = next(inner)
    except StopIteration:
      if self.num_batches is None:
        raise
      batch = empty_batch(self.local_batch_size, self.seq_len, self.mode)
    self._batches += 1
    return batch

  def __next__(self) -> dict[str, Any]:
    local = self.next_local()
    if self.mesh is None:
      return local
    return {
      k: jax.make_array_from_process_local_data(
        batch_sharding(self.mesh, self.batch_axes, v.ndim), v, (self.batch_size, *v.shape[1:])
      )
      for k, v in local.items()
    }

  def get_state(self) -> dict[str, Any]:
    return {
      "format": STATE_FORMAT,
      **self._layout,
      "cursor": self._open().get_state(),
      "batches": self._batches,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      found = state.get("format") if isinstance(state, dict) else type(state).__name__
      raise DataError(
        f"not an ir_jax data iterator state (format {found!r}, expected {STATE_FORMAT!r})"
      )
    diff = [
      f"{k}: saved {state.get(k)!r}, now {v!r}"
      for k, v in self._layout.items()
      if state.get(k) != v
    ]
    if diff:
      raise DataError(
        "the saved data iterator state belongs to a different pipeline ("
        + "; ".join(diff)
        + "); restore with the same data config and process "
        "layout, or start the data from scratch"
      )
    self._open().set_state(state["cursor"])
    self._batches = int(state.get("batches", 0))

  def _open(self) -> grain.DatasetIterator:
    if self._inner is None:
      raise DataError("this data iterator is closed; make a new one")
    return self._inner

  def close(self) -> None:
    inner, self._inner = getattr(self, "_inner", None), None
    if inner is not None:
      inner.close()


# grain's prefetch iterator errors in __del__ if it is still alive while the
# interpreter tears modules down; close live iterators before that happens.
_LIVE: weakref.WeakSet[DataIterator] = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for it in list(_LIVE):
    it.close()


def make_iterator(
  cfg: DataConfig,
  split: str | None = None,
  *,
  mode: str = PACK,
  shuffle: bool = True,
  num_epochs: int | None = None,
  mesh: Mesh | None = None,
  batch_axes: str | Sequence[str] = "data",
  process_index: int | None = None,
  process_count: int | None = None,
  tokenizer: TextTokenizer | None = None,
  base_dir: str | os.PathLike[str] | None = None,
  prepare_if_missing: bool = False,
  num_batches: int | None = None,
  max_doc_tokens: int = 0,
) -> DataIterator:
  """A DataIterator over `split` (default `cfg.train_split`) of the dataset `cfg` names;
  `max_doc_tokens` > 0 keeps each document's first that many tokens (documents only)."""
  split_name = split or cfg.train_split
  source = open_split(cfg, split_name, base_dir, prepare_if_missing)
  tok = tokenizer or load_text_tokenizer(cfg.tokenizer, cfg.add_bos, cfg.add_eos)
  return DataIterator(
    source,
    tok,
    seq_len=cfg.seq_len,
    batch_size=cfg.batch_size,
    mode=mode,
    shuffle=shuffle,
    seed=cfg.seed,
    num_epochs=num_epochs,
    mesh=mesh,
    batch_axes=batch_axes,
    process_index=process_index,
    process_count=process_count,
    prefetch=cfg.prefetch,
    num_batches=num_batches,
    # The training split's packed stream follows data.train_mix (fits, SGD steps
    # and calibration all read it); evaluation and other splits see documents.
    mix=cfg.train_mix if (split_name == cfg.train_split and mode == PACK) else DOCUMENTS,
    piece_chars=cfg.piece_chars,
    max_doc_tokens=max_doc_tokens,
  )


def train_iterator(cfg: DataConfig, **kwargs: Any) -> DataIterator:
  """Packed, shuffled rows of `cfg.train_split`, repeating forever."""
  return make_iterator(cfg, cfg.train_split, mode=PACK, shuffle=True, num_epochs=None, **kwargs)


def eval_iterator(cfg: DataConfig, **kwargs: Any) -> DataIterator:
  """One pass over `cfg.eval_split` in record order, one document piece per padded row.

  With several processes pass `num_batches` (see `DataIterator.local_batch_count`).
  """
  return make_iterator(cfg, cfg.eval_split, mode=PAD, shuffle=False, num_epochs=1, **kwargs)
