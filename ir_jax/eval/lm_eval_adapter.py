"""lm-eval-harness model type `ir_jax`: evaluate a routed ir_jax model on lm-eval tasks.

    import ir_jax.eval.lm_eval_adapter  # registers the model type
    lm_eval.simple_evaluate(model="ir_jax",
                            model_args="pretrained=runs/tiny,policy=informed,sparsity=0.4", ...)

or from a shell, `python -m ir_jax.lm_eval` (lm-eval's own CLI with this model type
registered; docs/lm_eval.md has a local task to copy):

    python -m ir_jax.lm_eval --model ir_jax \
        --model_args pretrained=runs/demo,policy=informed,sparsity=0.25 \
        --tasks ir_jax_tiny_mc --include_path tests/data/lm_eval_task --batch_size 1

Hub access. Importing this module sets HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1
unless they are already set (`datasets` reads them when lm-eval imports it), so a
task whose data lives on the HuggingFace hub fails instead of downloading. Run local
tasks: a YAML under `--include_path` whose `custom_dataset` function (or
`dataset_path: json` with local `data_files`) reads files on disk.

Model args: `pretrained` (anything `ir_jax.load_model` takes: a training workdir, a
checkpoint, a HF directory or a GGUF), `tokenizer` (default: `pretrained`'s own; for
a workdir the one its run trained with, read from WORKDIR/base when it came with the
base weights; "byte" for the built-in byte tokenizer), `policy`,
`sparsity`, `flops` (an executed-FLOPs budget, fraction of dense: the model's trained
table moved to it, its FLOPs counted at rows of `calibration_seq_len`), `mode` (topk | causal), `calibration` (text/JSONL file(s) or globs
for causal-mode thresholds; without it the model's stored thresholds are used, and
refused unless they were calibrated for this spec's capacities),
`calibration_seq_len`, `calibration_batches`, `batch_size`, `max_length`,
`max_gen_toks`, `seed`.

Scoring. A request is the row [prefix token] + context + continuation, cut on the
left to `max_length` tokens; the model reads the whole row (its last token too, which
top-k routing counts) and each token after the first is scored. Rows are sorted by
length (longest first; results come back in request order) and padded on the right
to a bucket length (32, 48, 64, 96, 128, ...: powers of two from 32 and 1.5 times
each, below `max_length`, then `max_length`), with padding rows filling every batch
to `batch_size`: a run compiles at most one program per bucket (13 for 2,048 tokens,
3 to 5 for short multiple-choice prompts) whatever the mix of lengths, and a row is
padded by less than a third of its bucket. Padded tokens take segment id 0 (the
model's padding convention; real tokens have 1), so no real token attends to one,
and causal routing decides each token by its own score against its unit's
threshold: padding changes no real token's attention, routing or score (up to
float32 summation order in programs of other shapes).
Top-k routing (mode=topk, any policy but dense) is the exception: it executes
k = round(capacity x length) tokens of each row, so padding would change k and
compete for its slots. There every row keeps exactly its own length (one program
per distinct length; only the batch is padded), as before bucketing. The random
policy draws its noise per program shape, so which tokens it executes (not how
many in expectation) depends on the padding, as it already depended on the batch.
Under a command (`python -m ir_jax.lm_eval`) scoring prints progress with rate and
ETA, says what it compiles, and ends with one line counting the programs compiled.
The prefix token is the BOS the tokenizer adds or declares (256 for the byte
tokenizer), else the model config's bos_token_id, else its eos_token_id.

Generation (`generate_until`) decodes greedily with a KV cache through
`ir_jax.routing.decode_step`, which routes causally: it needs mode=causal (or
policy=dense); top-k routing looks at future tokens and cannot decode.
"""

from __future__ import annotations

import os

# lm-eval imports `datasets`, which reads these at import time; nothing here may
# reach a hub. (Set HF_HOME to a scratch directory before importing lm_eval too.)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ir_jax.api import load_model
from ir_jax.config import ConfigError
from ir_jax.data import sources
from ir_jax.data.config import DataConfig, DataError, FileSpec
from ir_jax.data.tokenize import load_text_tokenizer
from ir_jax.eval.evaluate import Document, pack_documents
from ir_jax.generate import model_tokenizer
from ir_jax.nll import token_nll
from ir_jax.progress import active, counter, doing
from ir_jax.routing import (
  RoutingSpec,
  calibrate_thresholds,
  check_calibrated,
  decode_step,
  init_cache,
  trained_spec,
)

NAME = "ir_jax"


# Rows shorter than this are padded to it: the smallest program a run compiles.
MIN_BUCKET = 32


@nnx.jit(static_argnames=("spec",))
def token_logprobs(
  model: Any, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array, spec: RoutingSpec
) -> tuple[jax.Array, jax.Array]:
  """(log p(token t+1 | tokens <= t) `[B, T-1]`, whether it is the argmax `[B, T-1]`);
  `segment_ids` 0 marks padding, which no real token attends to."""
  logits = model(tokens_BxT, segment_ids_BxT=segment_ids_BxT, routing=spec)
  target = tokens_BxT[:, 1:]
  return -token_nll(logits[:, :-1], target), jnp.argmax(logits[:, :-1], axis=-1) == target


def bucket_lengths(max_length: int) -> tuple[int, ...]:
  """The row lengths scoring pads to: MIN_BUCKET times powers of two, and 1.5 times each,
  below `max_length`; then `max_length`. (Powers of two alone padded PIQA and Social IQa
  prompts by 31%, the 1.5x steps by 19%, for one more program.)"""
  out, n = [], MIN_BUCKET
  while n < max_length:
    out += [m for m in (n, n * 3 // 2) if m < max_length]
    n *= 2
  return (*out, max_length)


def batch_plan(
  lengths: Sequence[int], rows: int, buckets: Sequence[int] | None
) -> list[tuple[int, list[int]]]:
  """Batches of at most `rows` request indices, each with the row length its program
  takes: the smallest of `buckets` that holds every row (None: each row's own length,
  exactly). Longest rows first, so a row too long for memory fails at once and the ETA
  starts pessimistic; rows of one length batch together."""
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  groups: dict[int, list[int]] = {}
  for i in order:
    n = lengths[i]
    if buckets is None:
      key = n
    else:
      fits = [b for b in buckets if b >= n]
      if not fits:
        raise ConfigError(f"a row of {n} tokens is longer than the longest bucket {buckets[-1]}")
      key = fits[0]
    groups.setdefault(key, []).append(i)
  return [
    (length, idx[s : s + rows]) for length, idx in groups.items() for s in range(0, len(idx), rows)
  ]


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")


@register_model(NAME)
class IrJaxLM(LM):
  """An ir_jax model at one routing spec, as an lm-eval `LM`."""

  def __init__(
    self,
    pretrained: str,
    tokenizer: str | None = None,
    policy: str = "dense",
    sparsity: float = 0.0,
    flops: float = 0.0,
    mode: str = "topk",
    calibration: str | None = None,
    calibration_seq_len: int = 256,
    calibration_batches: int = 4,
    batch_size: int | str = 8,
    max_length: int | None = None,
    max_gen_toks: int = 64,
    seed: int = 0,
    **kwargs: Any,
  ) -> None:
    super().__init__()
    # lm-eval passes device, dtype etc. for every model type; JAX chooses devices itself.
    self.model = load_model(str(pretrained))
    # The model's trained capacity table when it has one: moved to the FLOPs budget
    # `flops` (its FLOPs quoted at rows of calibration_seq_len tokens), else to `sparsity`.
    self.spec = trained_spec(
      self.model,
      RoutingSpec(
        policy=str(policy),
        sparsity=float(sparsity),
        flops=float(flops),
        mode=str(mode),
        seed=int(seed),
      ),
      seq_len=int(calibration_seq_len),
    )
    tok_spec = str(tokenizer or model_tokenizer(str(pretrained)))
    self.tok = load_text_tokenizer(tok_spec, add_bos=None, add_eos=False)
    try:  # the BOS the tokenizer declares, even if its post-processor does not add it
      declared = load_text_tokenizer(tok_spec, add_bos=True, add_eos=False).prefix
    except DataError:
      declared = ()
    cfg = self.model.config
    if self.tok.prefix or declared:
      self.prefix_id = int((self.tok.prefix or declared)[0])
    elif cfg.bos_token_id is not None:
      self.prefix_id = int(cfg.bos_token_id)
    elif cfg.eos_token_id is not None:
      self.prefix_id = int(cfg.eos_token_id)
    else:
      raise ConfigError(f"{pretrained}: no BOS or EOS token to condition an empty context on")
    self.eos_id = cfg.eos_token_id
    self.batch = 8 if str(batch_size).startswith("auto") else int(batch_size)
    self.max_length = int(max_length or cfg.max_position_embeddings)
    self.max_gen_toks = int(max_gen_toks)
    if self.batch < 1 or self.max_length < 2:
      raise ConfigError(
        f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}"
      )
    # Top-k routing counts a row's tokens (k = capacity x length): padding would change
    # which tokens execute, so there each row keeps its own length (see the module doc).
    exact = self.spec.mode == "topk" and self.spec.policy != "dense"
    self.buckets = None if exact else bucket_lengths(self.max_length)
    self.shapes: set[tuple[int, int]] = set()  # (rows, length) of every program run
    if calibration and self.spec.mode == "causal" and self.spec.policy != "dense":
      self._calibrate(str(calibration), int(calibration_seq_len), int(calibration_batches))
    check_calibrated(self.model, self.spec)  # stored thresholds only for the spec they fit

  # ------------------------------------------------------------- helpers
  def _calibrate(self, files: str, seq_len: int, batches: int) -> None:
    cfg = DataConfig(files=tuple(FileSpec(p.strip()) for p in files.split(",") if p.strip()))
    stats = sources.Stats()
    docs = [
      Document(d.domain, d.source, self.encode(d.text, bos=True))
      for f in sources.resolve_files(cfg)
      for d in sources.read_documents(f, cfg, stats)
    ]
    full, _ = pack_documents(docs, seq_len)
    if not len(full):
      raise DataError(f"calibration={files}: fewer than calibration_seq_len={seq_len} tokens")
    rows = full.inputs[: batches * self.batch]
    calibrate_thresholds(
      self.model, [rows[i : i + self.batch] for i in range(0, len(rows), self.batch)], self.spec
    )

  def encode(self, text: str, bos: bool = False) -> list[int]:
    ids = self.tok.tokenizer.encode(text, add_special_tokens=False).ids
    return ([self.prefix_id] if bos else []) + list(ids)

  def _score(self, seqs: Sequence[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sequence: (logprobs, is-argmax) of tokens 1.. given their prefixes, in the
    order given; rows batched and padded as the module doc says."""
    for s in seqs:
      if not 2 <= len(s) <= self.max_length:
        raise ConfigError(
          f"a scored row needs 2..max_length={self.max_length} tokens, got {len(s)}"
        )
    plan = batch_plan([len(s) for s in seqs], self.batch, self.buckets)
    out: list[Any] = [None] * len(seqs)
    bar = counter("  scoring", len(seqs), unit="requests")
    done, padded, t0, new, compile_s = 0, 0, time.time(), 0, 0.0
    for length, chunk in plan:
      tokens = np.full((self.batch, length), self.prefix_id, np.int32)
      segments = np.zeros((self.batch, length), np.int32)  # 0: padding
      for j, i in enumerate(chunk):
        tokens[j, : len(seqs[i])], segments[j, : len(seqs[i])] = seqs[i], 1
      shape = (self.batch, length)
      fresh = shape not in self.shapes
      what = f"compiling the scoring program for {self.batch} rows of {length} tokens"
      t = time.time()
      with doing(what if fresh else "scoring"):
        lp, greedy = jax.device_get(
          token_logprobs(self.model, jnp.asarray(tokens), jnp.asarray(segments), self.spec)
        )
      if fresh:
        self.shapes.add(shape)
        new, compile_s = new + 1, compile_s + time.time() - t
      for j, i in enumerate(chunk):
        n = len(seqs[i])
        out[i] = (np.asarray(lp[j, : n - 1], np.float64), np.asarray(greedy[j, : n - 1]))
      done += len(chunk)
      padded += int(segments.size - segments.sum())
      bar(done, note=_count(len(self.shapes), "program"))
    if active() is not None and seqs:
      total = sum(length for length, _ in plan) * self.batch
      lengths = sorted({length for length, _ in plan})
      how = "padded to buckets" if self.buckets else "each its own length (top-k routing)"
      print(
        f"  scored {_count(len(seqs), 'request')} in {_count(len(plan), 'batch')} of "
        f"{_count(self.batch, 'row')}, {how}: {_count(len(lengths), 'row length')} "
        f"({lengths[0]}..{lengths[-1]} tokens), {_count(new, 'program')} compiled "
        f"({compile_s:.0f}s with their first batch), "
        f"{100 * padded / total:.0f}% of positions padding, {time.time() - t0:.0f}s",
        flush=True,
      )
    return out

  # ------------------------------------------------------------- the LM API
  def loglikelihood(
    self, requests: list[Any], disable_tqdm: bool = False
  ) -> list[tuple[float, bool]]:
    seqs, n_cont = [], []
    for req in requests:
      context, continuation = req.args
      cont = self.encode(continuation)
      if not cont:
        raise ConfigError(f"empty continuation after tokenizing {continuation!r}")
      full = (self.encode(context, bos=True) + cont)[-self.max_length :]
      if len(full) <= len(cont):
        raise ConfigError(
          f"a continuation of {len(cont)} tokens does not fit in max_length {self.max_length}"
        )
      seqs.append(full)
      n_cont.append(len(cont))
    out = []
    for (lp, greedy), n, req in zip(self._score(seqs), n_cont, requests):
      res = (float(lp[-n:].sum()), bool(greedy[-n:].all()))
      out.append(res)
      self.cache_hook.add_partial("loglikelihood", req.args, res)
    return out

  def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []  # every request's windows, scored in one pass
    for r, req in enumerate(requests):
      (text,) = req.args
      for w in get_rolling_token_windows(
        token_list=self.encode(text),
        prefix_token=self.prefix_id,
        max_seq_len=self.max_length - 1,  # rows of at most max_length tokens
        context_len=1,
      ):
        windows.append(make_disjoint_window(w))
        owner.append(r)
    scored = self._score([list(ctx) + list(pred) for ctx, pred in windows])
    totals = [0.0] * len(requests)
    for (lp, _), (_, pred), r in zip(scored, windows, owner):
      totals[r] += float(lp[-len(pred) :].sum())
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
    if self.spec.mode != "causal" and self.spec.policy != "dense":
      raise ConfigError(
        "generation routes causally (top-k looks at future tokens): use "
        "mode=causal (with calibration=FILE) or policy=dense"
      )
    out = []
    for req in requests:
      context, gen_kwargs = req.args
      gen_kwargs = dict(gen_kwargs or {})
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
      text = self._generate(self.encode(context, bos=True), max_new, until)
      out.append(text)
      self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
    return out

  def _generate(self, prompt: list[int], max_new: int, until: list[str]) -> str:
    """Greedy decoding, one token per step through the causal decode step."""
    prompt = prompt[-max(self.max_length - max_new, 1) :]
    total = min(len(prompt) + max_new, self.max_length)
    # A cache rounded up to 64 positions: one compile serves many request lengths
    # (positions beyond the current one are masked as future keys).
    cache_len = min(-(-total // 64) * 64, self.model.config.max_position_embeddings)
    cache = init_cache(self.model.config, 1, cache_len)
    tokens = list(prompt)
    new: list[int] = []
    for pos in range(total - 1):
      logits, cache, _ = decode_step(
        self.model, cache, jnp.asarray([tokens[pos]], jnp.int32), jnp.int32(pos), self.spec
      )
      if pos + 1 < len(tokens):
        continue
      nxt = int(np.argmax(np.asarray(logits[0])))
      if self.eos_id is not None and nxt == self.eos_id:
        break
      tokens.append(nxt)
      new.append(nxt)
      text = self.tok.decode(new)
      if any(u in text for u in until):
        break
    text = self.tok.decode(new)
    for u in until:
      if u and u in text:
        text = text.split(u)[0]
    return text


def main(argv: list[str] | None = None) -> None:
  """The lm-eval CLI with the `ir_jax` model type registered."""
  from lm_eval.__main__ import cli_evaluate

  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


if __name__ == "__main__":
  main()
