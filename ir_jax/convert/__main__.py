"""`python -m ir_jax.convert import --format {hf,gguf} SRC --out DIR`."""

from __future__ import annotations

import argparse
import time

from ir_jax.convert import FORMATS, import_weights
from ir_jax.errors import cli_main


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m ir_jax.convert",
      description="Convert model weights to and from ir_jax checkpoints.")
  sub = p.add_subparsers(dest="command", required=True)
  imp = sub.add_parser(
      "import", help="HF Llama directory or GGUF file -> ir_jax checkpoint directory",
      description="Import Llama weights into an ir_jax checkpoint directory (orbax "
                  "parameters + ir_jax.json config + tokenizer.json when available). "
                  "Nothing is fetched from a hub: SRC is a local path.")
  imp.add_argument("src", metavar="SRC",
                   help="HF directory (config.json + model.safetensors[.index.json]) or .gguf file")
  imp.add_argument("--format", choices=FORMATS, default=None,
                   help="source format (default: gguf if SRC ends in .gguf, else hf)")
  imp.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory")
  imp.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype to store parameters in (default float32)")
  imp.add_argument("--overwrite", action="store_true",
                   help="replace DIR if it exists (default: refuse)")
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "import":
    t0 = time.time()
    print(f"importing {args.src} ...", flush=True)
    out = import_weights(args.src, args.out, args.format, param_dtype=args.param_dtype,
                         overwrite=args.overwrite)
    print(f"wrote {out} in {time.time() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  cli_main(main, "ir_jax.convert")
