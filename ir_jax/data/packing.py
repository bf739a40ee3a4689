"""Tokenized documents -> fixed-size batches of rows, packed or padded, with a resumable cursor.

Row format (every field `[B, T]`, T = seq_len):
  inputs       int32   token ids, 0 on padding
  targets      int32   the next token of the same segment, 0 where there is none
  loss_mask    float32 1.0 where `targets` is a real next token, else 0.0
  positions    int32   0, 1, ... within each segment (restart per segment), 0 on padding
  segment_ids  int32   1, 2, ... per segment within a row, 0 on padding

A segment is one document, or one piece of a document longer than the
space left in a row ("pack": documents are concatenated and cut at row
ends, so every token lands in exactly one row; "pad": each row holds one
piece of one document, for evaluation). Tokens attend only within their
segment; a piece that continues a document restarts at position 0 because
the rest of the document is not in view. "pad" rows also carry, per row
(`[B]` int32, -1 on padding rows): `doc_ids` (record index in the split),
`chunk_ids` (0, 1, ... piece of that document) and `domain_ids`.

A model step uses them as
  logits_BxTxV = model(inputs, positions, segment_ids)
  loss = sum(cross_entropy(logits_BxTxV, targets) * loss_mask) / sum(loss_mask)
so the first token of every segment is context only, never a target.

The cursor (`{"doc": i, "offset": k}`: next token is token k of the i-th
document of the shuffled stream) is the whole iterator state: restoring it
re-reads document i and continues with the same rows.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

PACK, PAD = "pack", "pad"
MODES = (PACK, PAD)
ROW_FIELDS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
PAD_ROW_FIELDS = ("doc_ids", "chunk_ids", "domain_ids")


def _blank(local_batch: int, seq_len: int, mode: str) -> dict[str, np.ndarray]:
  shape = (local_batch, seq_len)
  out = {name: np.zeros(shape, np.int32) for name in ("inputs", "positions", "segment_ids")}
  if mode == PAD:
    out.update({name: np.full(local_batch, -1, np.int32) for name in PAD_ROW_FIELDS})
  return out


def empty_batch(local_batch: int, seq_len: int, mode: str) -> dict[str, np.ndarray]:
  """A batch of padding rows only: nothing to attend to, nothing in the loss."""
  return finish_rows(_blank(local_batch, seq_len, mode))


def finish_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Add next-token `targets` and `loss_mask` (no target across a segment boundary)."""
  inputs_BxT, segment_ids_BxT = batch["inputs"], batch["segment_ids"]
  same_BxT1 = (segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1]) & (segment_ids_BxT[:, :-1] != 0)
  targets_BxT = np.zeros_like(inputs_BxT)
  targets_BxT[:, :-1] = np.where(same_BxT1, inputs_BxT[:, 1:], 0)
  loss_mask_BxT = np.zeros(inputs_BxT.shape, np.float32)
  loss_mask_BxT[:, :-1] = same_BxT1
  rest = {k: v for k, v in batch.items() if k not in ROW_FIELDS}
  return {
    "inputs": inputs_BxT,
    "targets": targets_BxT,
    "loss_mask": loss_mask_BxT,
    "positions": batch["positions"],
    "segment_ids": segment_ids_BxT,
    **rest,
  }


class TokenBatches(grain.IterDataset):
  """Local batches `[local_batch, seq_len]` from a MapDataset of tokenized documents.

  Each element of `docs` is a dict with `tokens` (int32 `[n]`), `doc_id` and
  `domain_id`. A final partial batch is filled with padding rows.
  """

  def __init__(self, docs: grain.MapDataset, seq_len: int, local_batch: int, mode: str) -> None:
    super().__init__(docs)
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    self.docs, self.seq_len, self.local_batch, self.mode = docs, seq_len, local_batch, mode

  def __iter__(self) -> "TokenBatchIterator":
    return TokenBatchIterator(self.docs, self.seq_len, self.local_batch, self.mode)


class TokenBatchIterator(grain.DatasetIterator):
  """Fills rows from a cursor into the document stream; state is the cursor."""

  def __init__(self, docs: grain.MapDataset, seq_len: int, local_batch: int, mode: str) -> None:
    super().__init__()
    self._docs, self._seq_len, self._local_batch, self._mode = docs, seq_len, local_batch, mode
    self._num_docs = len(docs)
    self._doc, self._offset = 0, 0
    self._cached: tuple[int, dict[str, Any]] | None = None

  def _get(self, i: int) -> dict[str, Any]:
    # A long document spans rows and batches; tokenize it once.
    if self._cached is None or self._cached[0] != i:
      self._cached = (i, self._docs[i])
    return self._cached[1]

  def _fill_row(self, b: int, out: dict[str, np.ndarray]) -> bool:
    """Writes row b from the cursor; False if the stream is exhausted before any token."""
    t_len, fill, seg = self._seq_len, 0, 0
    while fill < t_len and self._doc < self._num_docs:
      doc = self._get(self._doc)
      tokens = doc["tokens"]
      if self._offset >= len(tokens):  # an empty document, or one just finished
        self._doc, self._offset = self._doc + 1, 0
        continue
      if self._mode == PAD and fill > 0:
        break
      take = min(t_len - fill, len(tokens) - self._offset)
      seg += 1
      out["inputs"][b, fill : fill + take] = tokens[self._offset : self._offset + take]
      out["segment_ids"][b, fill : fill + take] = seg
      out["positions"][b, fill : fill + take] = np.arange(take, dtype=np.int32)
      if self._mode == PAD:
        out["doc_ids"][b] = doc["doc_id"]
        out["chunk_ids"][b] = self._offset // t_len
        out["domain_ids"][b] = doc["domain_id"]
      fill += take
      self._offset += take
      if self._offset == len(tokens):
        self._doc, self._offset = self._doc + 1, 0
    return fill > 0

  def __next__(self) -> dict[str, np.ndarray]:
    out = _blank(self._local_batch, self._seq_len, self._mode)
    rows = 0
    for b in range(self._local_batch):
      if not self._fill_row(b, out):
        break
      rows += 1
    if rows == 0:
      raise StopIteration
    return finish_rows(out)

  def get_state(self) -> dict[str, Any]:
    return {"doc": int(self._doc), "offset": int(self._offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    doc, offset = state.get("doc"), state.get("offset")
    if not (
      isinstance(doc, int)
      and isinstance(offset, int)
      and 0 <= doc <= self._num_docs
      and offset >= 0
    ):
      raise ValueError(
        f"bad packing cursor {state!r}: expected ints doc in [0, {self._num_docs}] and offset >= 0"
      )
    self._doc, self._offset = doc, offset
    self._cached = None
