"""`python -m ir_jax.convert {import,export} ...`."""

from __future__ import annotations

import argparse
import time

from ir_jax.config import refuse_remote
from ir_jax.convert import FORMATS, import_weights
from ir_jax.convert.export import DEFAULT_SHARD_SIZE, export
from ir_jax.convert.export import FORMATS as EXPORT_FORMATS
from ir_jax.errors import cli_main
from ir_jax.progress import Progress


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m ir_jax.convert",
    description="Convert model weights to and from ir_jax checkpoints.",
  )
  sub = p.add_subparsers(dest="command", required=True)
  imp = sub.add_parser(
    "import",
    help="HF Llama directory or GGUF file -> ir_jax checkpoint directory",
    description="Import Llama weights into an ir_jax checkpoint directory (orbax "
    "parameters + ir_jax.json config + tokenizer.json when available). "
    "A directory written by `export` (routing.json + routing.safetensors "
    "beside the HF weights) keeps its trained forecasters, routers, "
    "thresholds and routing spec. Nothing is fetched from a hub: SRC is a "
    "local path.",
  )
  imp.add_argument(
    "src",
    metavar="SRC",
    help="HF directory (config.json + model.safetensors[.index.json]) or .gguf file",
  )
  imp.add_argument(
    "--format",
    choices=FORMATS,
    default=None,
    help="source format (default: gguf if SRC ends in .gguf, else hf)",
  )
  imp.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory")
  imp.add_argument(
    "--param-dtype",
    choices=("float32", "bfloat16"),
    default=None,
    help="dtype to store parameters in (default float32, or the export's)",
  )
  imp.add_argument(
    "--overwrite", action="store_true", help="replace DIR if it exists (default: refuse)"
  )
  exp = sub.add_parser(
    "export",
    help="ir_jax checkpoint or training workdir -> HF directory + routing modules",
    description="Export a trained model: a HuggingFace Llama directory (LoRA merged into "
    "the base weights; loadable by transformers.LlamaForCausalLM) plus "
    "routing.safetensors (forecasters, routers, thresholds) and routing.json "
    "(layout, routing spec, thresholds' meaning). Written under a temporary "
    "name and renamed at the end.",
  )
  exp.add_argument(
    "src",
    metavar="CKPT_DIR",
    help="ir_jax checkpoint directory (ir_jax.json) or ir_jax.train workdir "
    "(run.json; its newest finished checkpoint)",
  )
  exp.add_argument("--out", required=True, metavar="DIR", help="output directory")
  exp.add_argument(
    "--format",
    choices=EXPORT_FORMATS,
    default="hf",
    help="routing.safetensors layout: hf (ir_jax names, default) or reference "
    "(the public PyTorch code's lw_attn / router_attention names)",
  )
  exp.add_argument(
    "--max-shard-size",
    default=DEFAULT_SHARD_SIZE,
    metavar="SIZE",
    help="split model weights into shards of at most SIZE (e.g. 5GB, 500MB, "
    "20KiB) with model.safetensors.index.json (default %(default)s)",
  )
  exp.add_argument(
    "--overwrite",
    action="store_true",
    help="replace DIR if it exists and is not empty (default: refuse)",
  )
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  refuse_remote(args.command, args.src)
  refuse_remote("--out", args.out)
  t0 = time.time()
  if args.command == "import":
    print(f"importing {args.src} ...", flush=True)
    out = import_weights(
      args.src,
      args.out,
      args.format,
      param_dtype=args.param_dtype,
      overwrite=args.overwrite,
      progress=Progress("  tensors", 1, unit="tensors"),
      log=lambda m: print(m, flush=True),
    )
  else:
    print(f"exporting {args.src} ({args.format}) ...", flush=True)
    out = export(
      args.src,
      args.out,
      args.format,
      overwrite=args.overwrite,
      max_shard_size=args.max_shard_size,
      log=lambda m: print(m, flush=True),
      progress=Progress("  tensors", 1, unit="tensors"),
    )
  print(f"wrote {out} in {time.time() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  cli_main(main, "ir_jax.convert")
