"""Ahead-of-time compile (ir_jax.aot) of configs/tiny.py for the 8 fake CPU devices.

What is checked against what:
  memory   XLA's per-chip figures for every stage are positive
  FLOPs    the analytic step FLOPs vs a hand count for the tiny shapes, and vs
           XLA's own count of an unrolled (not scanned) compile
  CLI      exit 0 when it fits, 1 when it does not (a tiny HBM), 2 on a user error
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import wide_tiny_config

from ir_jax import aot
from ir_jax.config import ConfigError
from ir_jax.train import steps
from ir_jax.train.config import settings_from_config

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_cfg", TINY)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 4, 1
  return cfg


# Hand count for configs/tiny.py, batch 8 x 64, per token and layer (2 FLOPs per
# multiply-add): d 64, 4 heads / 2 KV heads of 16, MLP 160, vocab 257, LFF rank 100,
# router hidden 128, 2 layers; routing informed at sparsity 0.4 -> k = round(0.6 * 64) = 38.
B, T, L = 8, 64, 2
Q_O = 2 * (2 * 64 * 64)  # q and o projections: 16,384
KV = 2 * (2 * 64 * 32)  # k and v projections: 8,192
CORE = 2 * (2 * 32.5 * 64)  # scores + values over (64 + 1) / 2 keys (causal), 4 x 16 dims: 8,320
MLP = 3 * (2 * 64 * 160)  # gate, up, down: 61,440
HEAD = 2 * 64 * 257  # 32,896
LFF = 2 * (2 * 64 * 100)  # d -> 100 -> d: 25,600
ROUTER = 2 * 64 * 128 + 2 * 128  # d -> 128 -> 1: 16,640
K = 38


def test_analytic_flops_equal_a_hand_count():
  s = settings_from_config(tiny_config())
  cfg = s.model
  dense = B * T * (L * (Q_O + KV + CORE + MLP) + HEAD)
  assert dense == 113_442_816
  assert aot.step_flops(cfg, "infer", None, B, T)["total"] == dense
  # Forecaster stage: dense layers, no LM head, two LFFs per layer; backward
  # only inside the LFFs (dW2, hidden gradient, dW1 = 1.5x their forward).
  fwd = B * T * L * (Q_O + KV + CORE + MLP + 2 * LFF)
  got = aot.step_flops(cfg, "forecaster", None, B, T)
  assert (got["forward"], got["total"]) == (fwd, fwd + B * T * L * 2 * 1.5 * LFF)
  # Routed inference: K/V, LFFs and routers on every token, units on the top 38.
  spec = dataclasses.replace(s.routing, mode="topk", gate="hard", compute="gathered")
  routed = B * (T * HEAD + L * (T * (KV + 2 * LFF + 2 * ROUTER) + K * (Q_O + CORE) + K * MLP))
  assert routed == 164_114_432
  assert aot.step_flops(cfg, "infer", spec, B, T)["total"] == routed
  # Router stage (Gumbel gates: every unit runs): backward = activation gradients
  # through the forward, attention core twice, router weight gradients.
  rspec = steps.router_spec(s.routing, s.train.router)
  fwd = B * T * (HEAD + L * (Q_O + KV + CORE + MLP + 2 * LFF + 2 * ROUTER))
  bwd = fwd + B * T * L * CORE + B * T * L * 2 * ROUTER
  assert aot.step_flops(cfg, "router", rspec, B, T)["total"] == fwd + bwd == 442_499_072


def test_every_stage_compiles_for_8_cpu_devices_with_positive_memory():
  recs = aot.run(tiny_config(), "cpu:8", list(aot.AOT_STAGES))
  assert [r["stage"] for r in recs] == list(aot.AOT_STAGES)
  for r in recs:
    assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert (r["chips"], r["batch"], r["seq_len"], r["per_host_batch"]) == (8, 8, 64, 8)
    assert r["argument_gib"] > 0 and r["temp_gib"] > 0 and r["total_gib"] > 0, r
    assert r["total_gib"] >= r["argument_gib"]
    assert r["fits"] is None and "step_s" not in r  # a CPU has no HBM size or peak
    assert r["flops"] > 0
  trained = {r["stage"]: r["trained_params"] for r in recs}
  assert trained["infer"] == 0 and trained["forecaster"] > 0 and trained["lora"] > 0


def test_analytic_flops_agree_with_xla_on_an_unrolled_compile():
  # XLA counts a scanned layer body once; unrolled it counts every layer, plus
  # elementwise work the analytic (matmul-only) count leaves out.
  cfg = tiny_config()
  cfg.model.scan_layers = False
  (r,) = aot.run(cfg, "cpu:8", ["infer_dense"])
  ratio = r["xla_flops_per_chip"] * r["chips"] / r["flops"]
  assert 1.0 <= ratio < 1.2, ratio


def test_per_chip_temporaries_do_not_grow_with_the_global_batch():
  # One 128-token row per chip on an FSDP mesh of 2, then 8 devices: with the
  # activations pinned to the batch axes (ir_jax.sharding.constrain) each chip
  # holds only its own rows' logits; unconstrained, XLA replicated the batch
  # around the LM head and loss (router step: 40 MiB on 2 chips, 108 MiB on 8).
  temps = []
  for n in (2, 8):
    cfg = wide_tiny_config(n)
    (r,) = aot.run(cfg, f"cpu:{n}", ["router"])
    temps.append(r["temp_gib"])
  assert temps[1] < 1.25 * temps[0], temps


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "ir_jax.aot", "--config", TINY, *args],
    cwd=REPO,
    check=False,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )


def test_cli_exit_status_says_whether_it_fits():
  ok = _cli(
    "--topology",
    "cpu:8",
    "--stage",
    "infer_dense",
    "--hbm_gib",
    "16",
    "--peak_tflops",
    "1",
    "--markdown",
  )
  assert ok.returncode == 0, ok.stderr
  assert "FITS" in ok.stdout and "estimated step" in ok.stdout
  assert "| infer_dense | cpu:8 | 8x1x1 | 8 x 64 | yes |" in ok.stdout
  small = _cli("--topology", "cpu:8", "--stage", "infer_dense", "--hbm_gib", "1e-6")
  assert small.returncode == 1 and "DOES NOT FIT" in small.stdout
  bad = _cli("--topology", "tpu9:4x4")
  assert bad.returncode == 2 and bad.stderr.startswith("ir_jax.aot: error: --topology")
  assert "Traceback" not in bad.stderr


def test_tpu_topology_without_libtpu_is_a_user_error():
  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is installed here")
  with pytest.raises(ConfigError, match="needs libtpu"):
    aot.target_devices("v5e:4x4")


def test_tpu_out_of_memory_message_is_read_as_does_not_fit():
  msg = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    "temporaries (18.49G) exceeds available HBM (15.75G)."
  )
  assert aot._oom(msg) == (18.49, 15.75)
  assert aot._oom("INTERNAL: something else") is None


def _last_line(text: str) -> str:
  lines = [l for l in text.splitlines() if l.strip()]
  return lines[-1] if lines else ""


def test_mesh_that_does_not_fit_the_devices_is_a_one_line_error():
  r = _cli(
    "--topology", "cpu:8", "--stage", "infer_dense", "--config.mesh.data=3", "--config.mesh.fsdp=1"
  )
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip() == _last_line(r.stderr)  # exactly one line
  assert r.stderr.startswith("ir_jax.aot: error: mesh data=3xfsdp=1xtensor=1 needs 3 devices")


def test_batch_that_does_not_divide_the_data_shards_is_a_one_line_error():
  r = _cli(
    "--topology",
    "cpu:8",
    "--stage",
    "infer_dense",
    "--config.mesh.data=-1",
    "--config.mesh.fsdp=1",
    "--config.data.batch_size=6",
  )
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip() == _last_line(r.stderr)
  assert "batch size 6 is not divisible by the 8 data shards" in r.stderr


NO_LIBTPU = (
  "libtpu is not installed (pip install 'ir_jax[tpu]'); TPU topologies cannot be "
  "compiled for on this machine"
)
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=NO_LIBTPU)


@needs_libtpu
def test_tiny_config_compiles_for_a_tpu_v5e_2x2_slice(tmp_path):
  # libtpu's compiler, not the CPU's: 4 v5e chips on one host. The records must
  # describe that target, and the analytic FLOPs must equal the cpu:8 compile's
  # (same batch, same model), since they depend on shapes only.
  out = tmp_path / "aot.jsonl"
  r = _cli("--topology", "v5e:2x2", "--stage", "infer_dense,router", "--json", str(out))
  assert r.returncode == 0, r.stderr[-2000:]
  recs = [json.loads(l) for l in out.read_text().splitlines()]
  assert [x["stage"] for x in recs] == ["infer_dense", "router"]
  cfg = tiny_config()
  cfg.mesh.data, cfg.mesh.fsdp = 4, 1
  ref = {x["stage"]: x for x in aot.run(cfg, "cpu:4", ["infer_dense", "router"])}
  for x in recs:
    assert x["chip"] == "TPU v5e" and x["chips"] == 4 and x["hosts"] == 1
    assert x["fits"] is True and 0 < x["total_gib"] < x["hbm_gib"] == pytest.approx(16.0)
    assert x["argument_gib"] > 0 and x["compile_s"] > 0
    assert x["flops"] == ref[x["stage"]]["flops"]


@needs_libtpu
def test_topology_libtpu_does_not_know_is_a_user_error():
  r = _cli("--topology", "v5e:3x7", "--stage", "infer_dense")
  assert r.returncode == 2, r.stderr[-2000:]
  # libtpu writes its own log lines to stderr first; ours is the last, and one line.
  assert _last_line(r.stderr).startswith("ir_jax.aot: error: --topology v5e:3x7: libtpu refused")
  assert "Traceback" not in r.stderr
