"""Where routed decode can save time on a TPU: XLA's cost analysis of one decode step.

    python launch/tpu_decode_view.py --config configs/llama7b.py --topology v5e:1x1 \
        --batches 1,8,64,256 --cache 512 --depths 1,2 --json docs/bench/tpu_decode_view.json

Compiles `ir_jax.routing.decode_body` (one token per row, KV cache of
`--cache` positions, weights and cache on one chip) for a TPU topology with
libtpu, dense and routed, with the layers unrolled at two depths so the
per-layer cost is the difference (XLA's cost analysis counts a scanned body
once). Routed variants at `--sparsity` (capacity c = 1 - sparsity):
  rows       static row capacity, both units (top ceil(c x B) rows, gathered)
  rows-attn  the same for attention only (MLP executes every row)
  rows-mlp   the same for the MLP only
Sink protection is off in the routed variants: it only matters at position 0,
and its `lax.cond` (run every row when a sink is present) would be counted
with both branches. For the same reason the threshold form, whose skip is a
`lax.cond` per unit, is left to the analysis in docs/performance.md.
Per layer it reports XLA FLOPs and bytes accessed, and the roofline time
max(FLOPs / peak, bytes / HBM bandwidth) of the chip, each as a ratio to dense.
Needs libtpu (`pip install 'ir_jax[tpu]'`); nothing runs on a TPU.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the checkout's own ir_jax, also where another one is installed

from ir_jax.experiments import tpu_decode  # noqa: E402
from ir_jax.files import write_json  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/llama7b.py")
  p.add_argument("--topology", default="v5e:1x1")
  p.add_argument("--batches", default="1,8,64,256")
  p.add_argument("--cache", type=int, default=512)
  p.add_argument("--sparsity", type=float, default=0.4)
  p.add_argument("--depths", default="1,2")
  p.add_argument("--json")
  args = p.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  d0, d1 = (int(d) for d in args.depths.split(","))
  out = tpu_decode.measure(args.config, args.topology, batches, args.cache, args.sparsity, (d0, d1))
  lines = tpu_decode.table(out)
  print("\n".join(lines))
  out["table"] = lines
  if args.json:
    write_json(args.json, out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
