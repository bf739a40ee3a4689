"""The lm-eval-harness adapter on a local YAML task, against our own scoring.

loglikelihood   every (context, continuation) lm-eval asked for vs log-softmax (numpy)
                of our routed forward over [prefix] + context + continuation
generation      the text lm-eval got vs ir_jax.routing.generate (greedy, causal) cut at
                the task's stop string
workdir         the README's command line on a trained workdir whose tokenizer (a BPE
                trained here) lives only in WORKDIR/base: the logged log-likelihoods vs
                our forward over that BPE's ids (the tokenizers library, not ir_jax)
bucketing       requests of many lengths, padded to a few bucket lengths and batched, vs
                each request scored alone, unpadded; programs compiled counted by JAX's
                own compile events; the padded model's causal gates vs the unpadded ones
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

# `datasets` reads these when lm_eval imports it: no hub, a scratch cache.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="ir_jax_hf_home_"))

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

lm_eval = pytest.importorskip("lm_eval")

from ir_jax import checkpoint  # noqa: E402
from ir_jax.config import ConfigError, from_config_dict  # noqa: E402
from ir_jax.eval import lm_eval_adapter  # noqa: E402  (registers model type "ir_jax")
from ir_jax.model import init_model  # noqa: E402
from ir_jax.routing import RoutingSpec, generate  # noqa: E402

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "tests", "data", "lm_eval_task")
CALIB = os.path.join(REPO, "tests", "data", "eval", "calibration.txt")
NEWS = os.path.join(REPO, "assets", "text", "news", "lee.cor")
BYTE_EOS = 256
BPE_VOCAB = 320


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A random tiny model of configs/tiny.py (byte vocabulary) as an ir_jax checkpoint."""
  spec = importlib.util.spec_from_file_location(
    "tiny_cfg", os.path.join(REPO, "configs", "tiny.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = from_config_dict(mod.get_config().model)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(init_model(cfg, seed=5))))
  return checkpoint.save(str(tmp_path_factory.mktemp("ckpt") / "tiny"), cfg, params)


def _evaluate(model, task: str, model_args: str | None = None) -> dict:
  from lm_eval.tasks import TaskManager

  tm = TaskManager(include_path=TASKS, include_defaults=False)
  return lm_eval.simple_evaluate(
    model=model, model_args=model_args, tasks=[task], task_manager=tm, log_samples=True
  )


@nnx.jit(static_argnames=("spec",))
def _forward(model, tokens_BxT, spec):
  return model(tokens_BxT, routing=spec)


def _own_logprob(model, spec: RoutingSpec, context: str, continuation: str) -> float:
  ctx = list(context.encode("utf-8"))
  cont = list(continuation.encode("utf-8"))
  toks = np.asarray([[BYTE_EOS, *ctx, *cont]], np.int32)
  logits = np.asarray(_forward(model, jnp.asarray(toks), spec), np.float64)[0]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  pos = np.arange(len(ctx), len(ctx) + len(cont))  # logits at t predict token t + 1
  return float(logp[pos, toks[0, pos + 1]].sum())


# Routed requests go one per forward: identical byte tokens get exactly equal router
# scores, and the rounding of a differently shaped batch can break such a tie the other
# way (a different top-k choice). The dense case checks batched scoring.
@pytest.mark.parametrize("policy,sparsity,batch", [("informed", 0.4, 1), ("dense", 0.0, 4)])
def test_loglikelihood_matches_own_scoring(ckpt, policy, sparsity, batch):
  res = _evaluate(
    "ir_jax",
    "ir_jax_tiny_mc",
    f"pretrained={ckpt},tokenizer=byte,policy={policy},sparsity={sparsity},batch_size={batch}",
  )
  assert res["results"]["ir_jax_tiny_mc"]["sample_len"] == 4
  assert 0.0 <= res["results"]["ir_jax_tiny_mc"]["acc,none"] <= 1.0
  from ir_jax.api import load_model

  model = load_model(ckpt)
  spec = RoutingSpec(policy=policy, sparsity=sparsity)
  n = 0
  for sample in res["samples"]["ir_jax_tiny_mc"]:
    for (context, continuation), [(lp, _)] in zip(sample["arguments"], sample["resps"]):
      assert lp == pytest.approx(
        _own_logprob(model, spec, context, continuation), rel=1e-5, abs=1e-4
      )
      n += 1
  assert n == 11  # every choice of every question


def test_generation_matches_causal_decoding(ckpt):
  lm = lm_eval_adapter.IrJaxLM(
    pretrained=ckpt,
    tokenizer="byte",
    policy="informed",
    sparsity=0.5,
    mode="causal",
    calibration=CALIB,
    calibration_seq_len=64,
    batch_size=2,
  )
  assert np.isfinite(np.asarray(lm.model.routing.threshold[...])).all()
  res = _evaluate(lm, "ir_jax_tiny_gen")
  samples = res["samples"]["ir_jax_tiny_gen"]
  assert len(samples) == 2
  for s in samples:
    prompt = s["arguments"][0][0]
    toks = np.asarray([[BYTE_EOS, *prompt.encode("utf-8")]], np.int32)
    out, _ = generate(lm.model, toks, 8, lm.spec)
    new = [int(t) for t in out[0, toks.shape[1] :]]
    if BYTE_EOS in new:
      new = new[: new.index(BYTE_EOS)]
    want = lm.tok.decode(new).split("\n")[0]
    assert s["resps"][0][0] == want


def test_generation_needs_causal_routing(ckpt):
  lm = lm_eval_adapter.IrJaxLM(
    pretrained=ckpt, tokenizer="byte", policy="informed", sparsity=0.5, mode="topk"
  )

  class Req:
    args = ("Q: hi\nA:", {"until": ["\n"], "max_gen_toks": 2})

  with pytest.raises(ConfigError, match="mode=causal"):
    lm.generate_until([Req()])


def test_loglikelihood_rolling_matches_own_scoring(ckpt):
  lm = lm_eval_adapter.IrJaxLM(pretrained=ckpt, tokenizer="byte", policy="dense")
  texts = ["The sky on a clear day is blue", "Snow fell on the hills for three days."]
  # Both texts' windows are scored in one pass, in buckets; each total goes to its text.
  got = lm.loglikelihood_rolling([_Req(t) for t in texts])
  want = [_own_logprob(lm.model, lm.spec, "", t) for t in texts]
  assert got == pytest.approx(want, rel=1e-5)


def test_command_line_entry_point_registers_the_model(ckpt, tmp_path):
  # lm-eval's own flags through `python -m ir_jax.lm_eval` (lm_eval alone would not find
  # the "ir_jax" model type); its logged log-likelihoods equal our own scoring.
  out = tmp_path / "lm_eval_out"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ir_jax.lm_eval",
      "--model",
      "ir_jax",
      "--model_args",
      f"pretrained={ckpt},tokenizer=byte,policy=dense",
      "--batch_size",
      "1",
      "--tasks",
      "ir_jax_tiny_mc",
      "--include_path",
      TASKS,
      "--output_path",
      str(out),
      "--log_samples",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  samples = sorted(out.rglob("samples_ir_jax_tiny_mc_*.jsonl"))
  assert len(samples) == 1, sorted(str(p) for p in out.rglob("*"))
  from ir_jax.api import load_model

  model = load_model(ckpt)
  spec = RoutingSpec(policy="dense")
  n = 0
  for line in samples[0].read_text().splitlines():
    sample = json.loads(line)
    for args, resp in zip(sample["arguments"].values(), sample["resps"]):
      want = _own_logprob(model, spec, args["arg_0"], args["arg_1"])
      assert float(resp[0][0]) == pytest.approx(want, rel=1e-5, abs=1e-4)
      n += 1
  assert n == 11  # every choice of every question


# ------------------------------------------------------- a workdir's own tokenizer
def _tiny_cfg():
  spec = importlib.util.spec_from_file_location(
    "tiny_cfg", os.path.join(REPO, "configs", "tiny.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.fixture(scope="module")
def bpe_workdir(tmp_path_factory):
  """A tiny model trained a few steps (forecaster, router) on base weights imported from a
  HF directory that carries a byte-level BPE tokenizer (trained here on the news text),
  as the demo imports its GGUF; the HF directory is deleted afterwards, so the
  tokenizer is in WORKDIR/base only. Returns (workdir, path of a copy of the BPE)."""
  if not os.path.exists(NEWS):
    pytest.skip("demo assets missing: run `bash launch/fetch_assets.sh`")
  import shutil

  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  from ir_jax.convert.export import export
  from ir_jax.text import read_text
  from ir_jax.train import run, settings_from_config

  root = tmp_path_factory.mktemp("bpe_workdir")
  tok_dir = root / "tok"
  tok_dir.mkdir()
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    read_text(NEWS).splitlines(),
    trainers.BpeTrainer(
      vocab_size=BPE_VOCAB,
      special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
    ),
  )
  tok.save(str(tok_dir / "tokenizer.json"))
  (tok_dir / "tokenizer_config.json").write_text(
    json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
  )
  shutil.copy(tok_dir / "tokenizer.json", root / "bpe_copy.json")

  cfg = _tiny_cfg()
  cfg.model.vocab_size = tok.get_vocab_size()
  cfg.model.bos_token_id = cfg.model.eos_token_id = 0  # <|endoftext|>
  model_cfg = from_config_dict(cfg.model)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(init_model(model_cfg, seed=7))))
  hf = str(root / "hf")
  export(checkpoint.save(str(root / "ckpt"), model_cfg, params, tokenizer_dir=str(tok_dir)), hf)
  shutil.rmtree(root / "ckpt")

  cfg.model.checkpoint = hf
  cfg.model.random_init = False
  cfg.data.tokenizer = hf  # as configs/smollm2_135m.py names its GGUF
  cfg.data.files = (NEWS,)
  cfg.data.data_dir = str(root / "tfds")
  cfg.data.batch_size = 4
  cfg.mesh.data = 1
  cfg.train.eval_batches = 0
  cfg.train.forecaster.steps = 1
  cfg.train.router.steps = 1
  cfg.routing.sparsity = 0.25
  # A uniform table: one top-k per unit type, so each request length compiles fast.
  cfg.train.router.allocation = "uniform"
  workdir = str(root / "work")
  run(settings_from_config(cfg), workdir, devices=jax.devices()[:1])
  shutil.rmtree(hf)
  assert os.path.isfile(os.path.join(workdir, "base", "tokenizer.json"))
  return workdir, str(root / "bpe_copy.json")


def test_readme_command_finds_a_workdirs_tokenizer_in_base(bpe_workdir, tmp_path):
  # The README's command line (plus --log_samples, to compare every choice), with the
  # trained workdir as `pretrained` and no tokenizer= argument.
  import tokenizers

  workdir, bpe = bpe_workdir
  out = tmp_path / "lm_eval"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ir_jax.lm_eval",
      "--model",
      "ir_jax",
      "--model_args",
      f"pretrained={workdir},policy=informed,sparsity=0.25",
      "--tasks",
      "ir_jax_tiny_mc",
      "--include_path",
      TASKS,
      "--batch_size",
      "1",
      "--output_path",
      str(out),
      "--log_samples",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (samples,) = sorted(out.rglob("samples_ir_jax_tiny_mc_*.jsonl"))
  from ir_jax.api import load_model
  from ir_jax.routing import trained_spec

  model = load_model(workdir)
  spec = trained_spec(model, RoutingSpec(policy="informed", sparsity=0.25))
  assert spec.capacities is None  # allocation "uniform": every unit at sparsity 0.25
  tok = tokenizers.Tokenizer.from_file(bpe)
  n = 0
  for line in samples.read_text().splitlines():
    sample = json.loads(line)
    for args, resp in zip(sample["arguments"].values(), sample["resps"]):
      ctx, cont = tok.encode(args["arg_0"]).ids, tok.encode(args["arg_1"]).ids
      toks = np.asarray([[0, *ctx, *cont]], np.int32)  # BOS <|endoftext|> = 0
      logits = np.asarray(_forward(model, jnp.asarray(toks), spec), np.float64)[0]
      logp = logits - logits.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      pos = np.arange(len(ctx), len(ctx) + len(cont))
      want = float(logp[pos, toks[0, pos + 1]].sum())
      assert float(resp[0][0]) == pytest.approx(want, rel=1e-5, abs=1e-4)
      n += 1
  assert n == 11  # every choice of every question


def test_missing_model_is_one_line(tmp_path, capsys, monkeypatch):
  from ir_jax import lm_eval as cli

  monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() hands lm-eval its own argv
  with pytest.raises(SystemExit) as e:
    cli.main(
      [
        "--model",
        "ir_jax",
        "--model_args",
        f"pretrained={tmp_path / 'nope'},policy=dense",
        "--tasks",
        "ir_jax_tiny_mc",
        "--include_path",
        TASKS,
      ]
    )
  err = capsys.readouterr().err
  assert e.value.code == 2, err[-3000:]
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("ir_jax.lm_eval: error: ") and "nope" in last, err[-3000:]


# --------------------------------------------------------------- length buckets
class _Req:
  def __init__(self, *args):
    self.args = args


with open(CALIB, encoding="utf-8") as f:
  _TEXT = f.read()
# (context bytes, continuation bytes): rows of 1 (the prefix) + context + continuation
# tokens, 8 lengths from 5 to 154, in the buckets 32 (rows of 6, 32: the edge, 5),
# 48 (48: the edge, 33), 64 (64: the edge), 128 (101) and 192 (154); given in no order
# of length, so the results must come back unsorted.
_SPANS = [(40, 7), (0, 5), (150, 3), (19, 12), (3, 1), (20, 12), (90, 10), (59, 4)]
_REQUESTS = [(_TEXT[:c], _TEXT[c : c + k]) for c, k in _SPANS]
_BUCKETS_HIT = 5


def _alone(model, spec: RoutingSpec, context: str, continuation: str) -> tuple[float, bool]:
  """One request scored by itself (one row of exactly its length, no padding, no segment
  ids): (log-likelihood from a float64 log-softmax, whether every token is the argmax)."""
  ctx, cont = list(context.encode("utf-8")), list(continuation.encode("utf-8"))
  toks = np.asarray([[BYTE_EOS, *ctx, *cont]], np.int32)
  logits = np.asarray(_forward(model, jnp.asarray(toks), spec), np.float64)[0]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  pos = np.arange(len(ctx), len(ctx) + len(cont))
  target = toks[0, pos + 1]
  return float(logp[pos, target].sum()), bool((logits[pos].argmax(-1) == target).all())


class _Compiles:
  """Counts XLA compiles of the adapter's scoring function, as JAX reports them."""

  def __init__(self) -> None:
    self.n = 0
    jax.monitoring.register_event_duration_secs_listener(self._seen)

  def _seen(self, event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      self.n += kwargs.get("fun_name") == "jit(token_logprobs)"


_COMPILES = _Compiles()


def test_batch_plan_by_hand():
  plan = lm_eval_adapter.batch_plan([5, 40, 33, 3, 64, 65], 2, (32, 64, 128))
  assert plan == [(128, [5]), (64, [4, 1]), (64, [2]), (32, [0, 3])]
  exact = lm_eval_adapter.batch_plan([5, 40, 5, 3], 2, None)
  assert exact == [(40, [1]), (5, [0, 2]), (3, [3])]
  assert lm_eval_adapter.bucket_lengths(512) == (32, 48, 64, 96, 128, 192, 256, 384, 512)
  assert lm_eval_adapter.bucket_lengths(100) == (32, 48, 64, 96, 100)
  assert lm_eval_adapter.bucket_lengths(64) == (32, 48, 64)
  assert lm_eval_adapter.bucket_lengths(20) == (20,)
  with pytest.raises(ConfigError, match="longer than the longest bucket 64"):
    lm_eval_adapter.batch_plan([65], 2, (32, 64))


# float32 throughout: a padded row runs its matmuls and softmaxes in programs of other
# shapes, so sums may be ordered differently; each token's log-probability then moves by
# a few float32 ulps of the logits (|logit| < 10, ulp ~1e-6), and a request's total
# (up to 12 tokens, ~5.5 nats each) by far less than 1e-5 of it.
@pytest.mark.parametrize(
  "policy,mode,sparsity", [("dense", "topk", 0.0), ("informed", "causal", 0.5)]
)
def test_buckets_score_as_each_request_alone(ckpt, policy, mode, sparsity):
  lm = lm_eval_adapter.IrJaxLM(
    pretrained=ckpt,
    tokenizer="byte",
    policy=policy,
    sparsity=sparsity,
    mode=mode,
    calibration=CALIB if mode == "causal" else None,
    calibration_seq_len=64,
    batch_size=2,
  )
  assert lm.buckets == lm_eval_adapter.bucket_lengths(512)  # configs/tiny.py's length
  got = lm.loglikelihood([_Req(c, k) for c, k in _REQUESTS])
  assert len(lm.shapes) == _BUCKETS_HIT  # 8 lengths, 5 buckets, one batch shape
  for (lp, greedy), (c, k) in zip(got, _REQUESTS):
    want_lp, want_greedy = _alone(lm.model, lm.spec, c, k)
    assert lp == pytest.approx(want_lp, rel=1e-5, abs=0)
    assert greedy == want_greedy


def test_compiles_bounded_and_progress_said(ckpt, capsys):
  from ir_jax.progress import Heartbeat

  # batch_size 3: shapes no other test compiles, so every program counted here is new.
  lm = lm_eval_adapter.IrJaxLM(pretrained=ckpt, tokenizer="byte", policy="dense", batch_size=3)
  before = _COMPILES.n
  with Heartbeat():
    lm.loglikelihood([_Req(c, k) for c, k in _REQUESTS])
  assert _COMPILES.n - before == _BUCKETS_HIT <= len(lm.buckets)  # not one per length (8)
  out = capsys.readouterr().out
  assert "  scoring 8/8 (100%)" in out and "requests/s" in out, out
  assert "8 requests in 5 batches of 3 rows, padded to buckets" in out, out
  assert "5 row lengths (32..192 tokens), 5 programs compiled" in out, out
  # The same shapes again: nothing compiles.
  before = _COMPILES.n
  lm.loglikelihood([_Req(c, k) for c, k in reversed(_REQUESTS)])
  assert _COMPILES.n == before


# Batch sizes no other test uses with this spec: every program counted here is new.
@pytest.mark.parametrize("batch", [2, 3])
def test_topk_routing_keeps_each_rows_length(ckpt, batch):
  # Top-k executes round(capacity x length) tokens per row: no length padding, so one
  # program per distinct length (rows of one length share it, the batch padded).
  lm = lm_eval_adapter.IrJaxLM(
    pretrained=ckpt, tokenizer="byte", policy="informed", sparsity=0.4, batch_size=batch
  )
  assert lm.buckets is None
  reqs = [_REQUESTS[1], _REQUESTS[5], (_TEXT[100:104], _TEXT[104])]  # rows of 6, 33, 6
  before = _COMPILES.n
  got = lm.loglikelihood([_Req(c, k) for c, k in reqs])
  assert _COMPILES.n - before == 2
  assert lm.shapes == {(batch, 6), (batch, 33)}
  for (lp, _), (c, k) in zip(got, reqs):
    assert lp == pytest.approx(_alone(lm.model, lm.spec, c, k)[0], rel=1e-5, abs=0)


def test_padding_leaves_causal_routing_of_real_tokens(ckpt):
  # What bucketing relies on: padded positions (segment id 0) change neither the gates
  # nor the logits of the real tokens before them, in causal routing.
  lm = lm_eval_adapter.IrJaxLM(
    pretrained=ckpt,
    tokenizer="byte",
    policy="informed",
    sparsity=0.5,
    mode="causal",
    calibration=CALIB,
    calibration_seq_len=64,
  )
  real = np.asarray([BYTE_EOS, *_TEXT[:39].encode("utf-8")], np.int32)  # 40 tokens
  other = np.asarray(list(_TEXT[100:164].encode("utf-8")), np.int32)  # a full row of 64
  padded = np.full((2, 64), BYTE_EOS, np.int32)
  padded[0, :40], padded[1] = real, other
  segments = np.zeros((2, 64), np.int32)
  segments[0, :40], segments[1] = 1, 1

  @nnx.jit(static_argnames=("spec",))
  def run(model, toks, seg, spec):
    return model(toks, segment_ids_BxT=seg, routing=spec, return_aux=True)

  logits_p, aux_p = run(lm.model, jnp.asarray(padded), jnp.asarray(segments), lm.spec)
  logits_a, aux_a = run(lm.model, jnp.asarray(real[None]), None, lm.spec)
  gate_p = np.asarray(aux_p["gate_BxT"])[:, :, 0, :40]  # [L, 2, B, T]
  gate_a = np.asarray(aux_a["gate_BxT"])[:, :, 0]
  assert 0 < gate_a.mean() < 1  # some tokens execute, some are forecast
  np.testing.assert_array_equal(gate_p, gate_a)
  np.testing.assert_allclose(
    np.asarray(logits_p)[0, :40], np.asarray(logits_a)[0], rtol=1e-5, atol=1e-5
  )
