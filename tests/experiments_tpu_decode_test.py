"""ir_jax.experiments.tpu_decode (launch/tpu_decode_view.py): the variants compared and the
table of per-layer costs as ratios to dense (compiling needs libtpu; not here)."""

from __future__ import annotations

from ir_jax.experiments import tpu_decode


def test_variants_are_dense_and_three_row_capacity_forms():
  v = tpu_decode.variants(0.4, layers=3)
  assert list(v) == ["dense", "rows", "rows-attn", "rows-mlp"]
  assert v["dense"].policy == "dense"
  assert all(s.policy == "informed" and not s.protect_sinks for k, s in v.items() if k != "dense")


def test_table_gives_dense_absolute_and_variants_as_ratios():
  per = lambda flops, nbytes, t, bound: dict(flops=flops, bytes=nbytes, roofline_s=t, bound=bound)
  out = dict(
    config="configs/x.py",
    topology="v5e:1x1",
    cache=512,
    sparsity=0.4,
    depths=[1, 2],
    rows=[
      dict(batch=8, variant="dense", per_layer=per(2.0e9, 4.0e8, 5e-4, "memory")),
      dict(batch=8, variant="rows", per_layer=per(1.5e9, 3.0e8, 4e-4, "memory")),
      dict(batch=256, variant="dense", fits=False),
      dict(batch=256, variant="rows", per_layer=per(1.0, 1.0, 1.0, "compute")),
    ],
  )
  lines = tpu_decode.table(out)
  assert lines[0] == (
    "configs/x.py decode step on v5e:1x1, KV cache 512, sparsity 0.4: per layer, ratio to dense"
  )
  assert lines[4] == "| 8 | dense | 2e+09 | 4e+08 | 500.0 us | memory |"
  assert lines[5] == "| 8 | rows | 0.75 | 0.75 | 0.80 | memory |"
  # No dense cost at B 256: nothing to compare with.
  assert lines[6] == "| 256 | dense | does not fit one chip at depth 2 | | | |"
  assert lines[7] == "| 256 | rows | does not fit one chip at depth 2 | | | |"
