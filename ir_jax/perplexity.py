"""Dense perplexity of a model on a text file: `python -m ir_jax.perplexity`.

The text is tokenized once, cut into non-overlapping windows of `--seq-len`
tokens, and every token after the first of each window is scored.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax import nll
from ir_jax.api import load_model
from ir_jax.config import refuse_remote
from ir_jax.errors import cli_main
from ir_jax.text import read_text
from ir_jax.tokenizer import load_tokenizer


@nnx.jit
def token_nll(model: nnx.Module, tokens_BxT: jax.Array) -> jax.Array:
  """Negative log-likelihood of tokens[:, 1:] given their prefixes, `[B, T-1]`."""
  return nll.token_nll(model(tokens_BxT)[:, :-1], tokens_BxT[:, 1:])


def perplexity(
  model: nnx.Module, ids: np.ndarray, seq_len: int, batch: int = 1, log_every: float = 10.0
) -> tuple[float, int]:
  """(perplexity, scored token count) over windows of `seq_len` tokens."""
  n_win = len(ids) // seq_len
  if n_win == 0:
    raise ValueError(f"the text has {len(ids)} tokens, fewer than --seq-len {seq_len}")
  windows = ids[: n_win * seq_len].reshape(n_win, seq_len)
  total, count, last = 0.0, 0, time.time()
  for start in range(0, n_win, batch):
    chunk = windows[start : start + batch]
    nll_BxT = np.asarray(token_nll(model, jnp.asarray(chunk, jnp.int32)), np.float64)
    total += nll_BxT.sum()
    count += nll_BxT.size
    if time.time() - last > log_every:
      print(
        f"  {start + len(chunk)}/{n_win} windows, running ppl {nll.perplexity(total, count):.3f}",
        flush=True,
      )
      last = time.time()
  return nll.perplexity(total, count), count


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m ir_jax.perplexity",
    description="Dense perplexity of a model (ir_jax checkpoint, HF directory or GGUF) "
    "on a local text file.",
  )
  p.add_argument("--model", required=True, help="checkpoint dir, HF directory or .gguf file")
  p.add_argument("--text", required=True, help="UTF-8 text file (Latin-1 news files are detected)")
  p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
  p.add_argument(
    "--max-tokens",
    type=int,
    default=4096,
    help="score at most this many tokens from the start of the text (default 4096)",
  )
  p.add_argument("--batch", type=int, default=1, help="windows per forward pass (default 1)")
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default=None,
    help="compute dtype (default: the model's)",
  )
  args = p.parse_args(argv)
  refuse_remote("--model", args.model)
  refuse_remote("--text", args.text)
  if args.seq_len < 2 or args.max_tokens < 2 or args.batch < 1:
    p.error("--seq-len and --max-tokens must be >= 2 and --batch >= 1")

  if not os.path.isfile(args.text):
    raise FileNotFoundError(f"{args.text}: no such text file")
  t0 = time.time()
  model = load_model(args.model, dtype=args.dtype)
  tok = load_tokenizer(args.model)  # checkpoint dir, HF dir or GGUF all carry one
  print(
    f"loaded {args.model} ({model.config.num_layers} layers, d={model.config.hidden_size}) "
    f"in {time.time() - t0:.1f}s",
    flush=True,
  )
  ids = np.asarray(tok.encode(read_text(args.text)).ids[: args.max_tokens], np.int64)
  t0 = time.time()
  ppl, n = perplexity(model, ids, args.seq_len, args.batch)
  dt = time.time() - t0
  print(
    f"perplexity {ppl:.3f} over {n} scored tokens of {args.text} "
    f"(windows of {args.seq_len}; {n / dt:.0f} tokens/s)"
  )
  return 0


if __name__ == "__main__":
  cli_main(main, "ir_jax.perplexity")
