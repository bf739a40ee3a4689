"""`python -m ir_jax.bench`: is routed inference really faster, and how close to the FLOP limit?

    python -m ir_jax.bench --preset wide --sparsity 0.25,0.4,0.7 --reps 5 --json bench.json
    python -m ir_jax.bench --config configs/llama7b.py --tpu v5e:4x4      # the TPU view

In one process, on random weights (nothing is downloaded; routing executes its
static capacity whatever the router has learned), it times:
  prefill  dense, routed (informed, gathered top-k) at each sparsity, and the
           same routed model executed the mask way (every unit computed and
           mixed by the mask, as the reference implementation does);
  decode   KV-cache decoding (`ir_jax.routing.decode_body` under one jitted
           `lax.scan` over steps), dense and routed with calibrated thresholds;
           with several rows (--batch) also static row capacity (each unit
           runs its top ceil(c x B) rows by router score, gathered).
Every variant is compiled ahead of time, warmed up, then timed in interleaved
rounds (dense, routed..., mask..., decode...; repeat) so that load from other
processes hits every variant alike. It reports median and spread of the
times, speedup over dense, the ideal speedup from the executed-FLOPs fraction
(`ir_jax.routing.flops`: units run + forecasters + routers) and their ratio
(efficiency), and XLA's memory analysis of each compiled program.

`--tpu TOPOLOGY` instead compiles the dense and routed inference steps of
`ir_jax.aot` for a TPU slice (libtpu) or `cpu:N` and compares XLA's cost
analysis of the two (see `ir_jax.bench_tpu`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ir_jax import aot, files
from ir_jax import bench_components as BC
from ir_jax import bench_profile as BP
from ir_jax import bench_trained as BT
from ir_jax.bench_programs import build_variants
from ir_jax.bench_summary import summarize, table, time_variants
from ir_jax.bench_tpu import HBM_BYTES_PER_S, tpu_table, tpu_view
from ir_jax.config import ConfigError, LlamaConfig, from_config_dict
from ir_jax.config_file import load_config
from ir_jax.errors import cli_main
from ir_jax.model import init_model
from ir_jax.provenance import git_commit

PROG = "ir_jax.bench"
DEFAULT_SPARSITIES = "0.25,0.4,0.7"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A Llama where the matmuls dominate: wide MLP, GQA, few layers, short vocabulary.
WIDE = dict(
  vocab_size=4096,
  hidden_size=2048,
  intermediate_size=8192,
  num_layers=4,
  num_heads=16,
  num_kv_heads=4,
  head_dim=128,
  rope_theta=10_000.0,
  max_position_embeddings=4096,
  tie_word_embeddings=False,
  dtype="float32",
  param_dtype="float32",
)


@dataclasses.dataclass(frozen=True)
class Preset:
  """A model (a configs/*.py file or a dict of LlamaConfig fields) and the shapes to time."""

  model: str | dict[str, Any]
  batch: int
  seq_len: int
  decode_steps: int


PRESETS = {
  "tiny": Preset("configs/tiny.py", 2, 64, 8),
  "smollm2-512": Preset("configs/smollm2_135m.py", 1, 512, 32),
  "smollm2-2048": Preset("configs/smollm2_135m.py", 1, 2048, 32),
  "wide": Preset(WIDE, 1, 512, 32),
}


# ------------------------------------------------------------------ model
def load_model_config(path: str) -> LlamaConfig:
  """The `model` section of a configs/*.py file (relative paths also tried from the repo)."""
  if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
  return from_config_dict(load_config(path).model)


# ------------------------------------------------------------------ command line
def _floats(text: str) -> list[float]:
  out = []
  for s in (x.strip() for x in text.split(",")):
    if not s:
      continue
    try:
      v = float(s)
    except ValueError:
      raise ConfigError(f"--sparsity: {s!r} is not a number") from None
    if not 0.0 < v < 1.0:
      raise ConfigError(f"--sparsity values must be in (0, 1), got {v}")
    out.append(v)
  if not out:
    raise ConfigError("--sparsity is empty")
  return out


def read_table(path: str, layers: int) -> list[list[float]]:
  """A per-unit capacity table from JSON (see --capacities), checked against the model."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"--capacities {path}: cannot read a JSON table ({e})") from None
  rows = data.get("capacities") if isinstance(data, dict) else data
  ok = isinstance(rows, list) and all(
    isinstance(r, list)
    and len(r) == 2
    and all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in r)
    for r in rows
  )
  if not ok:
    raise ConfigError(
      f"--capacities {path}: expected a list of [attention, MLP] capacities in "
      "[0, 1], one pair per layer"
    )
  if len(rows) != layers:
    raise ConfigError(f"--capacities {path} has {len(rows)} rows; the model has {layers} layers")
  return [[float(c) for c in r] for r in rows]


def _commit() -> str | None:
  return git_commit(REPO, short=True)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog=f"python -m {PROG}",
    description="Prefill and decode throughput of dense, routed (gathered) and mask-based "
    "routed inference, against the ideal speedup from executed FLOPs.",
  )
  p.add_argument(
    "--preset",
    choices=sorted(PRESETS),
    default="wide",
    help="model and shapes: tiny (tests), smollm2-512 / smollm2-2048 (SmolLM2-135M "
    "shapes, sequence 512 / 2048), wide (d 2048, MLP 8192, 4 layers)",
  )
  p.add_argument("--config", help="configs/*.py whose model section replaces the preset's model")
  p.add_argument("--batch", type=int, help="rows (default: the preset's)")
  p.add_argument("--seq-len", type=int, help="prefill tokens per row and decode cache length")
  p.add_argument("--decode-steps", type=int, help="decode steps per row (0: no decode)")
  p.add_argument(
    "--sparsity",
    help=f"comma-separated sparsities (default {DEFAULT_SPARSITIES}; "
    "with --tpu: the config's routing.sparsity)",
  )
  p.add_argument("--reps", type=int, default=5, help="timed interleaved rounds")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first")
  p.add_argument(
    "--k-multiple",
    type=int,
    help="round each unit's top-k capacity up to a multiple of this (default 8; with "
    "--workdir / --checkpoint: the run's)",
  )
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    help="compute and parameter dtype (default: the config's)",
  )
  p.add_argument("--no-mask", action="store_true", help="skip the mask-based baseline")
  p.add_argument(
    "--capacities",
    metavar="JSON",
    help="route by this per-unit capacity table, rescaled to each sparsity: a JSON "
    "list of [attention, MLP] capacities per layer, or an object with such a "
    "list under 'capacities' (e.g. docs/bench/wide_table_0.4.json)",
  )
  p.add_argument(
    "--no-prefill", action="store_true", help="time decode only (batched decode at many rows)"
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="write the result here")
  p.add_argument(
    "--tpu",
    metavar="TOPOLOGY",
    help="instead of timing: XLA's cost of dense vs routed inference of --config "
    "(default configs/llama7b.py) on a TPU slice (needs libtpu) or cpu:N",
  )
  p.add_argument(
    "--components",
    action="store_true",
    help="with --tpu: predict the time of each part of one routed prefill (units, "
    "forecasters, routers, gather/scatter, ...) on one chip of the slice from XLA's cost of "
    "each part compiled alone (ir_jax.bench_components), at the FLOPs fraction --flops",
  )
  p.add_argument(
    "--flops",
    type=float,
    default=0.8,
    help="with --components: route every unit at the uniform capacity whose executed FLOPs "
    "(forecasters and routers included) are this fraction of dense (default 0.8)",
  )
  p.add_argument(
    "--tpu-layers",
    default="2,4",
    help="two unrolled depths to compile for --tpu (per-layer cost by difference)",
  )
  p.add_argument(
    "--workdir",
    metavar="RUN",
    help="time a trained model instead: an ir_jax.train workdir, routed by its own table "
    "and budget (prefill at --seq-lens, one-row decode after the longest; see "
    "ir_jax.bench_trained)",
  )
  p.add_argument(
    "--checkpoint",
    metavar="PATH",
    help="like --workdir, for an ir_jax checkpoint or export directory",
  )
  p.add_argument(
    "--seq-lens",
    default="512,2048",
    help="with --workdir / --checkpoint: comma-separated prefill lengths (one row each)",
  )
  p.add_argument(
    "--profile",
    action="store_true",
    help="with --workdir / --checkpoint: instead of timing, run each prefill length dense and "
    "routed under jax.profiler and split the time into units, forecasters, routers, "
    "gather/scatter and the rest (ir_jax.bench_profile); calls per program: --reps",
  )
  p.add_argument("--quiet", action="store_true", help="no per-round lines")
  return p


def _ints(text: str, name: str) -> list[int]:
  try:
    out = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ConfigError(f"{name} must be comma-separated integers, got {text!r}") from None
  if not out or min(out) < 1:
    raise ConfigError(f"{name} must list lengths >= 1, got {text!r}")
  return out


def trained_main(args: argparse.Namespace, argv: Sequence[str], log: Callable[[str], None]) -> int:
  """`--workdir` / `--checkpoint`: the trained model's own table, dense vs routed."""
  if args.workdir and args.checkpoint:
    raise ConfigError("pass --workdir or --checkpoint, not both")
  if args.reps < 1 or args.warmup < 0:
    raise ConfigError("--reps must be >= 1 and --warmup >= 0")
  model, spec, path = BT.load_trained(args.workdir, args.checkpoint)
  cfg = model.config
  seq_lens = _ints(args.seq_lens, "--seq-lens")
  too_long = [t for t in seq_lens if t > cfg.max_position_embeddings]
  if too_long:
    raise ConfigError(
      f"--seq-lens {too_long} exceed the model's max_position_embeddings "
      f"{cfg.max_position_embeddings}; pass shorter --seq-lens"
    )
  steps = 32 if args.decode_steps is None else args.decode_steps
  if args.profile:
    steps = 0
  k_multiple = args.k_multiple or spec.k_multiple
  t0 = time.perf_counter()
  log(
    f"{path}: {cfg.num_layers} layers, d {cfg.hidden_size}, on {jax.default_backend()}; compiling..."
  )
  variants, tables = BT.build(model, spec, seq_lens, steps, k_multiple, args.seed, log)
  log(f"compiled {len(variants)} programs in {time.perf_counter() - t0:.0f}s")
  if args.profile:
    return _profile_main(args, argv, variants, tables, path, log)
  time_variants(variants, args.reps, args.warmup, log)
  result = dict(
    kind="trained",
    path=os.path.abspath(path),
    workdir=args.workdir,
    checkpoint=args.checkpoint,
    routing=dict(
      policy=spec.policy, sparsity=spec.sparsity, flops=spec.flops, capacities=spec.capacities
    ),
    model=cfg.to_dict(),
    seq_lens=seq_lens,
    decode_steps=steps,
    k_multiple=k_multiple,
    reps=args.reps,
    warmup=args.warmup,
    backend=jax.default_backend(),
    devices=[str(d) for d in jax.devices()[:1]],
    jax_version=jax.__version__,
    commit=_commit(),
    command="python -m ir_jax.bench " + " ".join(argv),
    memory_note="peak_bytes: XLA memory_analysis() of each compiled program",
    **BT.summarize(variants, tables, cfg, steps),
  )
  print(BT.table(result))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


def _components_main(args, argv, log) -> int:
  config = args.config or "configs/llama7b.py"
  cfg = load_model_config(config)
  if args.dtype:
    cfg = cfg.replace(dtype=args.dtype, param_dtype=args.dtype)
  seq_len = args.seq_len or 2048
  if not 0.0 < args.flops < 1.0:
    raise ConfigError(f"--flops must be a fraction of dense in (0, 1), got {args.flops}")
  target = aot.target_devices(args.tpu)
  kind = args.tpu.partition(":")[0]
  peak = target.chip.peak_flops
  bw = HBM_BYTES_PER_S.get(kind)
  if not peak or not bw:
    raise ConfigError(
      f"--components needs a chip with a known peak and HBM bandwidth (a TPU: "
      f"{sorted(HBM_BYTES_PER_S)}), got {args.tpu}"
    )
  cap = BC.capacity_for_flops(cfg, seq_len, args.flops)
  log(f"{config} on one chip of {args.tpu}: compiling each part at {seq_len} tokens ...")
  v = BC.predict(cfg, seq_len, cap, target.devices[0], peak, bw, log)
  v.update(
    config=config,
    topology=args.tpu,
    peak_flops=peak,
    hbm_bytes_per_s=bw,
    commit=_commit(),
    jax_version=jax.__version__,
    command="python -m ir_jax.bench " + " ".join(argv),
  )
  print(BC.report(v, f"{config} on one {target.chip.name} chip"))
  if args.json:
    files.write_json(args.json, v)
  return 0


def _profile_main(args, argv, variants, tables, path, log) -> int:
  prof = BP.profile_trained(variants, args.reps, log)
  texts = []
  for t in sorted({v.info["seq_len"] for v in variants if v.kind == "prefill"}):
    d, r = prof[f"prefill/dense@{t}"], prof[f"prefill/routed@{t}"]
    frac = tables[str(t)]["executed_fraction"]
    texts.append(BP.report(f"prefill 1 x {t} (routed: executed FLOPs {frac:.3f} of dense)", d, r))
  print("\n\n".join(texts))
  if args.json:
    files.write_json(
      args.json,
      dict(
        kind="profile",
        path=os.path.abspath(path),
        tables=tables,
        calls=args.reps,
        profile=prof,
        backend=jax.default_backend(),
        jax_version=jax.__version__,
        commit=_commit(),
        command="python -m ir_jax.bench " + " ".join(argv),
      ),
    )
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  log = (lambda _: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
  if args.profile and not (args.workdir or args.checkpoint):
    raise ConfigError("--profile profiles a trained model: pass --workdir RUN or --checkpoint PATH")
  if args.components and not args.tpu:
    raise ConfigError(
      "--components predicts per-part times on an accelerator: pass --tpu TOPOLOGY "
      "(e.g. v5e:2x2, with libtpu installed)"
    )
  if args.workdir or args.checkpoint:
    return trained_main(args, list(argv if argv is not None else sys.argv[1:]), log)
  if args.tpu and args.components:
    return _components_main(args, list(argv if argv is not None else sys.argv[1:]), log)
  if args.tpu:
    try:
      depths = tuple(int(x) for x in args.tpu_layers.split(","))
      assert len(depths) == 2
    except (ValueError, AssertionError):
      raise ConfigError(
        f"--tpu-layers must be two integers like 2,4, got {args.tpu_layers!r}"
      ) from None
    sp = _floats(args.sparsity)[0] if args.sparsity else None
    v = tpu_view(args.config or "configs/llama7b.py", args.tpu, depths, sp, log)
    v.update(commit=_commit(), jax_version=jax.__version__)
    print(tpu_table(v))
    if args.json:
      with open(args.json, "w", encoding="utf-8") as f:
        json.dump(v, f, indent=1)
    return 0
  preset = PRESETS[args.preset]
  sparsities = _floats(args.sparsity or DEFAULT_SPARSITIES)
  for name in ("reps", "batch", "seq_len"):
    val = getattr(args, name)
    if val is not None and val < 1:
      raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {val}")
  args.k_multiple = 8 if args.k_multiple is None else args.k_multiple
  if args.warmup < 0 or args.k_multiple < 1:
    raise ConfigError("--warmup must be >= 0 and --k-multiple >= 1")
  if args.config:
    cfg = load_model_config(args.config)
  elif isinstance(preset.model, str):
    cfg = load_model_config(preset.model)
  else:
    cfg = LlamaConfig(**preset.model)
  if args.dtype:
    cfg = cfg.replace(dtype=args.dtype, param_dtype=args.dtype)
  batch = args.batch or preset.batch
  seq_len = args.seq_len or preset.seq_len
  steps = preset.decode_steps if args.decode_steps is None else args.decode_steps
  if not 0 <= steps <= seq_len:
    raise ConfigError(f"--decode-steps must be in [0, seq_len={seq_len}], got {steps}")
  if args.no_prefill and steps == 0:
    raise ConfigError("--no-prefill with --decode-steps 0 leaves nothing to time")
  if seq_len > cfg.max_position_embeddings:
    raise ConfigError(
      f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
      f"{cfg.max_position_embeddings}"
    )
  cap_table = read_table(args.capacities, cfg.num_layers) if args.capacities else None
  t0 = time.perf_counter()
  model = init_model(cfg, args.seed)
  log(
    f"{args.preset}: {cfg.num_layers} layers, d {cfg.hidden_size}, MLP "
    f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, {cfg.dtype}; on "
    f"{jax.default_backend()}; compiling..."
  )
  variants = build_variants(
    model,
    batch,
    seq_len,
    steps,
    sparsities,
    k_multiple=args.k_multiple,
    mask=not args.no_mask,
    decode=steps > 0,
    seed=args.seed,
    prefill=not args.no_prefill,
    table=cap_table,
  )
  log(
    f"compiled {len(variants)} programs in {time.perf_counter() - t0:.0f}s; timing "
    f"{args.warmup} warm-up + {args.reps} interleaved rounds"
  )
  time_variants(variants, args.reps, args.warmup, log)
  for v in variants:  # the per-step "any row executes" rate, for batched decode
    if v.execution == "threshold":
      gates = np.asarray(v.fn(*v.args)[1])  # [N, L, 2, B]
      v.info["any_rate"] = gates.any(axis=3).mean(axis=0).tolist()
  result = dict(
    preset=args.preset,
    config=args.config,
    model=cfg.to_dict(),
    batch=batch,
    seq_len=seq_len,
    decode_steps=steps,
    sparsities=sparsities,
    capacities=args.capacities,
    reps=args.reps,
    warmup=args.warmup,
    k_multiple=args.k_multiple,
    backend=jax.default_backend(),
    devices=[str(d) for d in jax.devices()[:1]],
    jax_version=jax.__version__,
    commit=_commit(),
    command="python -m ir_jax.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    memory_note="peak_bytes: XLA memory_analysis() of each compiled program: arguments "
    "(weights, tokens) + outputs - aliased + temporaries",
    **summarize(variants, cfg, seq_len),
  )
  print(table(result))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


def _entry() -> None:
  cli_main(lambda: main(sys.argv[1:]), PROG)


if __name__ == "__main__":
  _entry()
