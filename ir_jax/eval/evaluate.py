"""Held-out perplexity of a routed model for every policy, sparsity and routing mode.

Chunking. Documents (each tokenized with the data config's BOS/EOS rule) are
concatenated in order and cut into rows of exactly `seq_len` tokens; a
document piece is one segment (tokens attend only within it, positions
restart at 0, its first token is context only, as in training's packed rows).
Every row is therefore full of real tokens, so the static top-k capacity
`k = round(capacity * seq_len)` applies to real tokens only. The tokens left
after the last full row form one shorter row of its own length r (its own
compile, k = round(capacity * r)). A last batch with fewer rows is completed
with padding rows; top-k picks per row, so padding rows take no execution slot
from real tokens, and every count here (realized sparsity, scored tokens)
is taken over real tokens only.

Records. One per (mode, policy, sparsity); `dense` once, at sparsity 0. Each
carries perplexity, scored token count, realized sparsity (overall, attention,
MLP), executed and ideal FLOPs fractions (`ir_jax.routing.flops`) and the
summed NLL of every document, so `ir_jax.eval.domain_mix.mix_perplexity` can
turn one evaluation into estimates for other domain mixes (`doc_losses`).

Causal mode routes by per-unit thresholds (what decoding uses); they are
calibrated (`routing.calibrate_thresholds`) on calibration batches that are
not the evaluated text, once per (policy, sparsity).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax import plotting
from ir_jax.bootstrap import ratio_interval
from ir_jax.config import ConfigError
from ir_jax.data.config import DataError
from ir_jax.data.tokenize import TextTokenizer
from ir_jax.eval.shift_mix import doc_losses  # noqa: F401  (also importable from here)
from ir_jax.model import Llama
from ir_jax.nll import perplexity, token_nll
from ir_jax.routing import MODES, POLICIES, RoutingSpec, calibrate_thresholds, flops, trained_spec

FORMAT = "ir_jax.eval/1"
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Document:
  """One evaluated document: its domain, where it came from, its token ids."""

  domain: str
  source: str
  tokens: np.ndarray  # int32 [n], BOS/EOS included


@dataclasses.dataclass(frozen=True)
class Rows:
  """Packed rows `[N, T]` (see the module docstring) plus the document of every token."""

  inputs: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray  # float32, 1 where targets is a real next token
  positions: np.ndarray
  segment_ids: np.ndarray  # 0 on padding
  doc_index: np.ndarray  # index into the document list, -1 on padding

  def __len__(self) -> int:
    return self.inputs.shape[0]

  def take(self, sl: slice, pad_to: int | None = None) -> "Rows":
    """Rows `sl`, completed with padding rows up to `pad_to` rows."""
    fields = {f.name: getattr(self, f.name)[sl] for f in dataclasses.fields(self)}
    n = fields["inputs"].shape[0]
    if pad_to is not None and n < pad_to:
      for k, v in fields.items():
        fill = -1 if k == "doc_index" else 0
        fields[k] = np.concatenate([v, np.full((pad_to - n,) + v.shape[1:], fill, v.dtype)])
    return Rows(**fields)


# ------------------------------------------------------------------ data
def tokenize_documents(
  texts: Iterable[tuple[str, str, str]], tokenizer: TextTokenizer, max_documents: int | None = None
) -> list[Document]:
  """(text, domain, source) triples -> Documents (at most `max_documents`)."""
  docs = []
  for text, domain, source in texts:
    if max_documents is not None and len(docs) >= max_documents:
      break
    docs.append(Document(domain, source, tokenizer.encode(text)))
  return docs


def pack_documents(docs: Sequence[Document], seq_len: int) -> tuple[Rows, Rows | None]:
  """(full rows `[N, seq_len]`, the last partial row `[1, r]` or None)."""
  if seq_len < 2:
    raise ConfigError(f"seq_len must be >= 2 (a row needs an input and its target), got {seq_len}")
  tokens = np.concatenate([d.tokens for d in docs]) if docs else np.zeros(0, np.int32)
  doc_of = (
    np.concatenate([np.full(len(d.tokens), i, np.int32) for i, d in enumerate(docs)])
    if docs
    else np.zeros(0, np.int32)
  )
  n_full = len(tokens) // seq_len

  def rows(tok: np.ndarray, doc: np.ndarray, t: int) -> Rows:
    tok, doc = tok.reshape(-1, t), doc.reshape(-1, t)
    # A new segment starts at every row start and every document change.
    starts = np.ones_like(doc, bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    seg = np.cumsum(starts, axis=1).astype(np.int32)
    idx = np.broadcast_to(np.arange(t, dtype=np.int32), tok.shape)
    start_at = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    same = np.zeros(tok.shape, bool)
    same[:, :-1] = ~starts[:, 1:]
    targets = np.zeros_like(tok)
    targets[:, :-1] = np.where(same[:, :-1], tok[:, 1:], 0)
    return Rows(
      tok.astype(np.int32),
      targets.astype(np.int32),
      same.astype(np.float32),
      (idx - start_at).astype(np.int32),
      seg,
      doc.astype(np.int32),
    )

  full = rows(tokens[: n_full * seq_len], doc_of[: n_full * seq_len], seq_len)
  r = len(tokens) - n_full * seq_len
  tail = rows(tokens[n_full * seq_len :], doc_of[n_full * seq_len :], r) if r >= 2 else None
  return full, tail


# ------------------------------------------------------------------ specs
@dataclasses.dataclass(frozen=True)
class Setting:
  mode: str
  policy: str
  sparsity: float
  flops: float = 0.0  # an executed-FLOPs budget instead of the sparsity (0: none)

  def spec(self, seed: int = 0) -> RoutingSpec:
    return RoutingSpec(
      policy=self.policy, sparsity=self.sparsity, flops=self.flops, seed=seed
    ).inference(self.mode)

  @property
  def label(self) -> str:
    return f"flops {self.flops:.2f}" if self.flops else f"sparsity {self.sparsity:.2f}"


def settings(
  policies: Sequence[str],
  sparsities: Sequence[float],
  modes: Sequence[str],
  budgets: Sequence[float] = (),
) -> list[Setting]:
  """Every (mode, policy, sparsity) and (mode, policy, FLOPs budget); `dense` once (top-k
  mode, sparsity 0), first."""
  for f in budgets:
    if not (isinstance(f, (int, float)) and 0.05 < f <= 1.0):
      raise ConfigError(f"a FLOPs budget must be a fraction of dense in (0.05, 1], got {f!r}")
  for p in policies:
    if p not in POLICIES:
      raise ConfigError(f"unknown policy {p!r}; choose from {','.join(POLICIES)}")
  for m in modes:
    if m not in MODES:
      raise ConfigError(f"unknown mode {m!r}; choose from {','.join(MODES)}")
  for s in sparsities:
    if not (isinstance(s, (int, float)) and 0.0 <= s <= 1.0):
      raise ConfigError(f"sparsity must be a number in [0, 1], got {s!r}")
  out = [Setting("topk", "dense", 0.0)] if "dense" in policies else []
  for m in modes:
    for p in policies:
      if p != "dense":
        out.extend(Setting(m, p, float(s)) for s in sparsities)
        out.extend(Setting(m, p, 0.0, float(f)) for f in budgets)
  if not out:
    raise ConfigError("nothing to evaluate: give at least one policy and one sparsity")
  return out


# ------------------------------------------------------------------ the step
@nnx.jit(static_argnames=("spec",))
def eval_rows(
  model: Llama, batch: dict[str, Array], rng: Array, spec: RoutingSpec
) -> dict[str, Array]:
  """Per-token NLL `[B, T]` (0 off the loss mask), executed (token, unit) counts `[L, 2]`
  over real tokens (segment id > 0), and units executed per token `[B, T]`."""
  logits, aux = model(
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
    routing=spec,
    rng=rng,
    return_aux=True,
  )
  nll = token_nll(logits, batch["targets"])
  nll_BxT = jnp.where(batch["loss_mask"] > 0, nll, 0.0)
  real_BxT = batch["segment_ids"] > 0
  # The decisions route_unit made, counted over real tokens.
  counts = jnp.sum(aux["gate_BxT"] & real_BxT[None, None], axis=(2, 3))
  return {
    "nll_BxT": nll_BxT,
    "exec_Lx2": counts.astype(jnp.float32),
    "exec_BxT": jnp.sum(aux["gate_BxT"], axis=(0, 1)).astype(jnp.float32),
    "real": jnp.sum(real_BxT).astype(jnp.float32),
  }


def _batches(full: Rows, tail: Rows | None, batch_size: int) -> Iterable[Rows]:
  for start in range(0, len(full), batch_size):
    yield full.take(slice(start, start + batch_size), pad_to=batch_size)
  if tail is not None:
    yield tail


def num_batches(full: Rows, tail: Rows | None, batch_size: int) -> int:
  return -(-len(full) // batch_size) + (tail is not None)


def evaluate_setting(
  model: Llama,
  full: Rows,
  tail: Rows | None,
  num_docs: int,
  spec: RoutingSpec,
  batch_size: int,
  progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
  """One record: perplexity, realized sparsity, per-document NLL sums and realized
  sparsity (`doc_sparsity`: the share of the document's real (token, unit) pairs
  approximated).

  `progress(batches_done)` is called after every batch."""
  nll_doc = np.zeros(num_docs, np.float64)
  tok_doc = np.zeros(num_docs, np.int64)
  exec_doc = np.zeros(num_docs, np.float64)
  real_doc = np.zeros(num_docs, np.float64)
  exec_Lx2, real = 0.0, 0.0
  key = jax.random.key(spec.seed)
  for i, rows in enumerate(_batches(full, tail, batch_size)):
    batch = {
      k: jnp.asarray(getattr(rows, k))
      for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids")
    }
    out = jax.device_get(eval_rows(model, batch, jax.random.fold_in(key, i), spec))
    mask = rows.loss_mask > 0
    np.add.at(nll_doc, rows.doc_index[mask], np.asarray(out["nll_BxT"], np.float64)[mask])
    np.add.at(tok_doc, rows.doc_index[mask], 1)
    real_tok = rows.segment_ids > 0
    np.add.at(exec_doc, rows.doc_index[real_tok], np.asarray(out["exec_BxT"])[real_tok])
    np.add.at(real_doc, rows.doc_index[real_tok], 1.0)
    exec_Lx2 = exec_Lx2 + np.asarray(out["exec_Lx2"], np.float64)
    real += float(out["real"])
    if progress is not None:
      progress(i + 1)
  tokens = int(tok_doc.sum())
  if not tokens:
    raise DataError(
      "the evaluated text gave no tokens to score (every document is a single "
      "token?); give more text"
    )
  nll = float(nll_doc.sum() / tokens)
  rate_Lx2 = exec_Lx2 / max(real, 1.0)
  return {
    "nll": nll,
    "perplexity": perplexity(nll_doc.sum(), tokens),
    "tokens": tokens,
    "realized_sparsity": float(1.0 - rate_Lx2.mean()),
    "sparsity_attn": float(1.0 - rate_Lx2[:, 0].mean()),
    "sparsity_mlp": float(1.0 - rate_Lx2[:, 1].mean()),
    "doc_nll": nll_doc.tolist(),
    "doc_sparsity": (1.0 - exec_doc / np.maximum(real_doc * exec_Lx2.size, 1.0)).tolist(),
    "doc_tokens": tok_doc.tolist(),
  }


def evaluate(
  model: Llama,
  docs: Sequence[Document],
  todo: Sequence[Setting],
  *,
  seq_len: int,
  batch_size: int,
  calibration: Callable[[], Iterable[np.ndarray]] | None = None,
  seed: int = 0,
  log: Callable[[str], None] = lambda s: None,
  progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> dict[str, Any]:
  """Evaluates every setting on `docs`; returns the JSON-able result (see `ir_jax.eval`).

  `calibration()` yields token batches `[B, T]` for causal-mode thresholds
  (needed only when a setting has mode "causal"). `progress(label, batches)`
  makes the per-batch callback of one setting (e.g. an ir_jax.progress.Progress).
  """
  if not docs:
    raise DataError("no documents to evaluate")
  if batch_size < 1:
    raise ConfigError(f"batch size must be >= 1, got {batch_size}")
  vocab = model.config.vocab_size
  top = max(int(d.tokens.max()) for d in docs if len(d.tokens))
  if top >= vocab:
    raise ConfigError(
      f"the tokenizer produced token id {top}, but the model's vocabulary has "
      f"{vocab} ids; use the model's tokenizer (data.tokenizer)"
    )
  full, tail = pack_documents(docs, seq_len)
  cfg = model.config
  calib_batches: list[np.ndarray] | None = None
  saved_thr = np.asarray(model.routing.threshold[...])
  records = []
  doc_tokens = None
  try:
    for st in todo:
      # A trained capacity table (rescaled to this sparsity) replaces the uniform capacity.
      spec = trained_spec(model, st.spec(seed), seq_len=seq_len)
      t0 = time.time()
      thresholds = None
      if st.mode == "causal" and st.policy != "dense":
        if calibration is None:
          raise ConfigError("causal mode needs calibration data for its thresholds")
        if calib_batches is None:
          calib_batches = [np.asarray(b, np.int32) for b in calibration()]
          if not calib_batches:
            raise DataError("the calibration data gave no batches")
        thresholds = calibrate_thresholds(model, calib_batches, spec).tolist()
      label = f"  {st.mode:6s} {st.policy:8s} {st.label}"
      bar = progress(label, num_batches(full, tail, batch_size)) if progress else None
      rec = evaluate_setting(model, full, tail, len(docs), spec, batch_size, bar)
      doc_tokens = rec.pop("doc_tokens")
      fl = flops(cfg, spec, seq_len)
      rec = {
        "mode": st.mode,
        "policy": st.policy,
        "sparsity": st.sparsity,
        "flops_budget": st.flops,
        "capacity_table": spec.capacities is not None,
        **rec,
        "flops_fraction": fl["executed_fraction"],
        "ideal_flops_fraction": fl["ideal_fraction"],
        "wall_s": round(time.time() - t0, 3),
      }
      if thresholds is not None:
        rec["thresholds"] = thresholds
      records.append(rec)
      log(
        f"  {st.mode:6s} {st.policy:8s} {st.label}: perplexity "
        f"{rec['perplexity']:.4f}, realized {rec['realized_sparsity']:.3f} "
        f"({rec['wall_s']:.1f}s)"
      )
  finally:
    model.routing.threshold[...] = jnp.asarray(saved_thr)
  documents = [
    {"domain": d.domain, "source": d.source, "tokens": int(n)} for d, n in zip(docs, doc_tokens)
  ]
  dense = next((r for r in records if r["policy"] == "dense"), None)
  if dense is not None and doc_tokens is not None:
    for r in records:  # x dense, with a 95% bootstrap interval over documents
      ratio, lo, hi = ratio_interval(r["doc_nll"], dense["doc_nll"], doc_tokens)
      r.update(ratio=ratio, ci_low=lo, ci_high=hi)
  return {
    "format": FORMAT,
    "seq_len": seq_len,
    "batch_size": batch_size,
    "chunking": "packed rows of seq_len, one segment per document piece; the remainder "
    "is one shorter row",
    "rows": len(full) + (tail is not None),
    "tail_row_tokens": 0 if tail is None else int(tail.inputs.shape[1]),
    "documents": documents,
    "records": records,
  }


# ------------------------------------------------------------------ reading results
def table(result: dict[str, Any]) -> str:
  """The records as a console table."""
  recs = result["records"]
  dense = next((r["perplexity"] for r in recs if r["policy"] == "dense"), None)
  head = (
    f"{'mode':6s} {'policy':8s} {'target':>8s} {'realized':>8s} {'attn':>6s} "
    f"{'mlp':>6s} {'FLOPs':>6s} {'perplexity':>11s} {'vs dense (95% CI)':>22s} {'tokens':>8s}"
  )
  lines = [head, "-" * len(head)]
  for r in recs:
    rel = "" if dense is None else f"{r['perplexity'] / dense:8.3f}"
    # the target: a FLOPs budget ("F0.80") or a pair sparsity
    target = f"F{r['flops_budget']:.2f}" if r.get("flops_budget") else f"{r['sparsity']:.2f}"
    if "ci_low" in r:
      rel = f"{r['ratio']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f})"
    lines.append(
      f"{r['mode']:6s} {r['policy']:8s} {target:>8s} "
      f"{r['realized_sparsity']:8.3f} {r['sparsity_attn']:6.3f} "
      f"{r['sparsity_mlp']:6.3f} {r['flops_fraction']:6.3f} {r['perplexity']:11.4f} "
      f"{rel:>22s} {r['tokens']:8d}"
    )
  return "\n".join(lines)


def plot(result: dict[str, Any], path: str, title: str = "") -> str:
  """Perplexity vs realized sparsity, one line per policy, one panel per mode; a PNG."""
  plt = plotting.pyplot()

  recs = result["records"]
  modes = [m for m in MODES if any(r["mode"] == m and r["policy"] != "dense" for r in recs)]
  dense = next((r for r in recs if r["policy"] == "dense"), None)
  fig, axes = plt.subplots(
    1, max(len(modes), 1), figsize=(5.5 * max(len(modes), 1), 4.2), squeeze=False, sharey=True
  )
  for ax, mode in zip(axes[0], modes or ["topk"]):
    for policy in POLICIES:
      # Realized, not target, sparsity: causal thresholds calibrated elsewhere can miss it.
      pts = sorted(
        (r["realized_sparsity"], r["perplexity"])
        for r in recs
        if r["mode"] == mode and r["policy"] == policy and policy != "dense"
      )
      if pts:
        if dense is not None and pts[0][0] > 0:
          pts = [(0.0, dense["perplexity"])] + pts
        ax.plot(*zip(*pts), marker="o", label=policy)
    if dense is not None:
      ax.axhline(
        dense["perplexity"],
        color="gray",
        linestyle="--",
        linewidth=1,
        label=f"dense {dense['perplexity']:.3g}",
      )
    ax.set_xlabel("realized sparsity (fraction of token-unit pairs approximated)")
    ax.set_title(f"{mode} routing")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  axes[0][0].set_ylabel("held-out perplexity")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  plotting.save(fig, path)
  return path
