"""`python -m ir_jax.generate MODEL --prompt TEXT`: the dense and the routed model write.

    python -m ir_jax.generate runs/demo --prompt "The capital of France is"

For each prompt the dense model's continuation, then the routed model's, are
printed as the tokens come, and after the routed one the share of (token, unit)
pairs it executed. The routed model decodes as a deployed one would: policy
informed, causal mode (a unit executes a token iff the router score passes the
unit's calibrated threshold), at the capacity table its thresholds were
calibrated for (for an `ir_jax.train` workdir: its trained table and budget).
Decoding is greedy unless `--temperature` is above 0. See docs/generate.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from ir_jax.config import ConfigError, refuse_remote
from ir_jax.data.config import DataError
from ir_jax.errors import cli_main
from ir_jax.routing import RoutingSpec, check_calibrated, decode_step, init_cache
from ir_jax.rundir import read_run
from ir_jax.tokenizer import TOKENIZER_JSON

PROG = "ir_jax.generate"
CACHE_ROUND = 64  # cache lengths round up to this: one compile serves many prompt lengths


def model_tokenizer(path: str) -> str:
  """The tokenizer of anything `ir_jax.load_model` takes, as `load_text_tokenizer` reads it.

  A checkpoint directory, HF directory or GGUF file carries its own. An
  `ir_jax.train` workdir keeps none at its top: it is the tokenizer the run
  trained with (its data.tokenizer, else its model.checkpoint); when that is the
  base weights' own source, the copy imported with them (`WORKDIR/base/tokenizer.json`,
  or the base checkpoint's), so the workdir does not need the original GGUF.
  """
  meta = read_run(path) if os.path.isdir(path) else None
  if meta is None:
    return path
  config = meta.get("config") or {}
  named = str((config.get("data") or {}).get("tokenizer") or "")
  source = str((config.get("model") or {}).get("checkpoint") or "")
  base = meta.get("base") or {}
  base_dir = str(base.get("path") or "") if base.get("kind") == "checkpoint" else ""
  has_base_tok = bool(base_dir) and os.path.isfile(os.path.join(base_dir, TOKENIZER_JSON))
  if named and os.path.normpath(named) != os.path.normpath(source):
    return named  # the run named a tokenizer of its own (e.g. "byte")
  if has_base_tok:
    return base_dir
  if named or source:
    return named or source
  raise DataError(
    f"{path}: the run names no tokenizer (data.tokenizer, model.checkpoint) and its "
    "base weights carry none; name one (a tokenizer.json, a model directory, a .gguf "
    "or 'byte')"
  )


def routed_spec(model: Any) -> Any:
  """Informed causal routing at the capacities the model's thresholds were calibrated
  for; None when they never were (an imported or untrained model)."""
  caps = np.asarray(model.routing.calibrated_for[...], np.float64)
  if (caps < 0).any():
    return None
  return RoutingSpec(policy="informed", mode="causal", capacities=tuple(map(tuple, caps)))


def decode(
  model: Any,
  prompt: list[int],
  max_new: int,
  spec: Any,
  *,
  eos: int | None = None,
  temperature: float = 0.0,
  seed: int = 0,
  cache_len: int | None = None,
  on_token: Callable[[list[int]], None] = lambda new: None,
) -> tuple[list[int], float, int]:
  """(new tokens, share of (token, unit) pairs executed, tokens fed to the model).

  One token per step through the KV-cache decode step (so every routing decision is
  causal); stops after `max_new` tokens or at `eos` (not included). `on_token` gets
  the new tokens so far after each one. `cache_len` (default: prompt + max_new rounded
  up to CACHE_ROUND) fixes the KV cache's length, so calls of one length share a compile.
  """
  cfg = model.config
  total = len(prompt) + max_new
  if total > cfg.max_position_embeddings:
    raise ConfigError(
      f"the prompt ({len(prompt)} tokens) plus --max-new-tokens {max_new} exceeds the "
      f"model's {cfg.max_position_embeddings} positions; shorten one of them"
    )
  check_calibrated(model, spec)
  cache = init_cache(cfg, 1, max(cache_len or 0, cache_length(cfg, total)))
  rng = np.random.default_rng(seed)
  tokens, new, executed = list(prompt), [], []
  for pos in range(total - 1):
    logits, cache, gates = decode_step(
      model, cache, jnp.asarray([tokens[pos]], jnp.int32), jnp.int32(pos), spec
    )
    executed.append(float(np.asarray(gates, np.float64).mean()))
    if pos + 1 < len(tokens):
      continue
    logits = np.asarray(logits[0], np.float64)
    if temperature > 0:
      p = np.exp((logits - logits.max()) / temperature)
      nxt = int(rng.choice(len(p), p=p / p.sum()))
    else:
      nxt = int(np.argmax(logits))
    if eos is not None and nxt == eos:
      break
    tokens.append(nxt)
    new.append(nxt)
    on_token(new)
  return new, float(np.mean(executed)), len(executed)


def cache_length(cfg: Any, total: int) -> int:
  """`total` positions rounded up to CACHE_ROUND, at most the model's."""
  return min(-(-total // CACHE_ROUND) * CACHE_ROUND, cfg.max_position_embeddings)


def warm_up(model: Any, specs: list[Any], cache_len: int) -> None:
  """Compiles the decode step for each spec at this cache length (seconds for SmolLM2 on
  a CPU), saying so, before any continuation is streamed."""
  t0 = time.time()
  print(f"compiling the decode step ({len(specs)} routing(s)) ...", flush=True)
  for spec in specs:
    cache = init_cache(model.config, 1, cache_len)
    decode_step(model, cache, jnp.zeros((1,), jnp.int32), jnp.int32(0), spec)
  print(f"compiled in {time.time() - t0:.1f}s", flush=True)


class Printer:
  """Prints a continuation as it grows: only the text not printed yet, holding back
  an incomplete UTF-8 character (decoded as U+FFFD) until its last byte comes."""

  def __init__(self, decode_fn: Callable[[list[int]], str]) -> None:
    self.decode_fn, self.shown = decode_fn, ""

  def __call__(self, new: list[int]) -> None:
    text = self.decode_fn(new)
    if text.endswith("\ufffd"):
      return
    if text.startswith(self.shown):
      print(text[len(self.shown) :], end="", flush=True)
    else:  # a merge changed earlier text: start the line again
      print("\n" + text, end="", flush=True)
    self.shown = text

  def finish(self, new: list[int]) -> None:
    """Prints what is left (an incomplete character too) and ends the line."""
    text = self.decode_fn(new)
    print(text[len(self.shown) :] if text.startswith(self.shown) else "\n" + text, flush=True)


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
  """--prompt values, then the non-empty lines of --prompt-file ("-": stdin)."""
  out = list(prompts)
  if prompt_file:
    if prompt_file == "-":
      lines = sys.stdin.read().splitlines()
    else:
      if not os.path.isfile(prompt_file):
        raise FileNotFoundError(f"--prompt-file {prompt_file}: no such file")
      with open(prompt_file, encoding="utf-8", errors="strict") as f:
        try:
          lines = f.read().splitlines()
        except UnicodeDecodeError as e:
          raise ConfigError(f"--prompt-file {prompt_file}: not UTF-8 text ({e.reason})") from None
    out += [line for line in lines if line.strip()]
  if not out:
    raise ConfigError("no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE")
  if any(not p.strip() for p in out):
    raise ConfigError("--prompt is empty; give the text to continue")
  return out


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m ir_jax.generate",
    description="Continue prompts with the dense model and with the routed model, side by "
    "side, streaming tokens as they come; after the routed continuation, the share of "
    "(token, unit) pairs it executed (prompt and new tokens). The routed model decodes "
    "with policy informed in causal mode (a unit executes a token iff its router score "
    "passes the unit's calibrated threshold) at the capacity table its thresholds were "
    "calibrated for: for an ir_jax.train workdir, its trained table and budget. A model "
    "whose thresholds were never calibrated (an imported HF or GGUF model) decodes dense "
    "only. Decoding stops at the model's EOS token or after --max-new-tokens.",
  )
  p.add_argument(
    "model",
    metavar="MODEL",
    help="an ir_jax.train workdir, an ir_jax checkpoint directory, a HuggingFace Llama "
    "directory or a .gguf file",
  )
  p.add_argument(
    "--prompt", action="append", default=[], help="text to continue (repeat for several)"
  )
  p.add_argument(
    "--prompt-file",
    metavar="FILE",
    help="UTF-8 file with one prompt per line (blank lines skipped); '-' reads stdin",
  )
  p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to add (default 32)")
  p.add_argument(
    "--tokenizer",
    default=None,
    help="a tokenizer.json, model directory, .gguf or 'byte' (default: MODEL's; for a "
    "workdir the one its run trained with, read from WORKDIR/base when it came with "
    "the base weights)",
  )
  p.add_argument(
    "--temperature",
    type=float,
    default=0.0,
    help="0 (default) decodes greedily; above 0 samples from softmax(logits / T)",
  )
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.max_new_tokens < 1:
    raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  if not np.isfinite(args.temperature) or args.temperature < 0:
    raise ConfigError(f"--temperature must be a number >= 0, got {args.temperature}")
  refuse_remote("MODEL", args.model)
  if not os.path.exists(args.model):
    raise FileNotFoundError(
      f"{args.model}: no such file or directory (expected a workdir, checkpoint "
      "directory, HuggingFace directory or .gguf file)"
    )
  prompts = read_prompts(args.prompt, args.prompt_file)

  # The weight loaders (orbax, the converters) load once the arguments are checked, so
  # --help and a mistyped path answer at once.
  from ir_jax.api import load_model
  from ir_jax.data.tokenize import load_text_tokenizer

  t0 = time.time()
  print(f"loading {args.model} ...", flush=True)
  model = load_model(args.model)
  tok = load_text_tokenizer(args.tokenizer or model_tokenizer(args.model), add_eos=False)
  cfg = model.config
  if tok.vocab_size > cfg.vocab_size:
    raise ConfigError(
      f"tokenizer {tok.source!r} has {tok.vocab_size} tokens, more than the model's "
      f"{cfg.vocab_size}; pass the model's own tokenizer (--tokenizer)"
    )
  routed = routed_spec(model)
  print(f"loaded in {time.time() - t0:.1f}s: {cfg.num_layers} layers, d={cfg.hidden_size}")
  if routed is None:
    print(
      "routed: skipped; the model's causal thresholds were never calibrated (train it "
      "with ir_jax.train, whose router stage calibrates them)"
    )
  else:
    mean = float(np.mean(routed.capacities))
    print(
      f"routed: informed, causal, the table its thresholds were calibrated for "
      f"(sparsity {1 - mean:.3f}: {mean:.1%} of units executed on calibration text)"
    )
  runs = [("dense", RoutingSpec(policy="dense"))] + ([("routed", routed)] if routed else [])
  encoded = [[int(t) for t in tok.encode(text)] for text in prompts]
  cache_len = cache_length(cfg, max(map(len, encoded)) + args.max_new_tokens)
  if max(map(len, encoded)) + args.max_new_tokens <= cfg.max_position_embeddings:
    warm_up(model, [spec for _, spec in runs], cache_len)  # else decode() says what is wrong
  for i, (text, ids) in enumerate(zip(prompts, encoded)):
    print(f"\n[{i + 1}/{len(prompts)}] {text}")
    for name, spec in runs:
      print(f"--- {name}:", flush=True)
      show = Printer(tok.decode)
      new, share, fed = decode(
        model,
        ids,
        args.max_new_tokens,
        spec,
        eos=cfg.eos_token_id,
        temperature=args.temperature,
        seed=args.seed,
        cache_len=cache_len,
        on_token=show,
      )
      show.finish(new)
      if name == "routed":
        print(
          f"--- routed executed {share:.1%} of (token, unit) pairs over the {fed} tokens "
          f"it read ({1 - share:.1%} approximated)"
        )
  return 0


if __name__ == "__main__":
  cli_main(main, PROG)
