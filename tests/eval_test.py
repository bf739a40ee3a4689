"""`python -m ir_jax.eval` on configs/tiny.py with a random model.

What is checked against what:
  dense        per-document NLL vs a plain (unrouted) forward of every document piece
               alone, log-softmax in numpy float64
  sparsity 0   routed perplexity vs the dense record, exactly
  realized     top-k sparsity vs the count k = round(capacity x row length) per real row:
               padding rows must not count
  documents    per-document sums vs the totals; mix_perplexity at the empirical mix vs
               the measured perplexity
  causal       thresholds calibrated on other text give roughly the target sparsity
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ir_jax import checkpoint
from ir_jax.config import ConfigError, from_config_dict
from ir_jax.config_file import load_config
from ir_jax.data.tokenize import load_text_tokenizer
from ir_jax.eval import runner
from ir_jax.eval.__main__ import main, parser, request_options
from ir_jax.eval.domain_mix import mix_perplexity
from ir_jax.eval.evaluate import doc_losses, pack_documents, tokenize_documents
from ir_jax.model import init_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "tiny.py")
DOCS = os.path.join(REPO, "tests", "data", "eval", "docs.jsonl")
CALIB = os.path.join(REPO, "tests", "data", "eval", "calibration.txt")
SEQ, BATCH = 64, 4
FIELDS = (
  "mode",
  "policy",
  "sparsity",
  "perplexity",
  "nll",
  "tokens",
  "realized_sparsity",
  "sparsity_attn",
  "sparsity_mlp",
  "flops_fraction",
  "ideal_flops_fraction",
  "doc_nll",
)


def tiny_model_cfg():
  return from_config_dict(load_config(CONFIG).model)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A random tiny model (random routers, near-zero forecasters) as an ir_jax checkpoint."""
  cfg = tiny_model_cfg()
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(init_model(cfg, seed=3))))
  return checkpoint.save(str(tmp_path_factory.mktemp("ckpt") / "tiny"), cfg, params)


def run_eval(out: str, *args: str) -> dict:
  assert (
    main(
      [
        "--config",
        CONFIG,
        "--data",
        DOCS,
        "--seq-len",
        str(SEQ),
        "--batch-size",
        str(BATCH),
        "--json",
        out,
        *args,
      ]
    )
    == 0
  )
  with open(out, encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def topk(ckpt, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("eval") / "topk.json")
  return out, run_eval(
    out,
    "--model",
    ckpt,
    "--policy",
    "informed,random,dense",
    "--sparsity",
    "0,0.5",
    "--mode",
    "topk",
  )


def _rec(result: dict, policy: str, sparsity: float, mode: str = "topk") -> dict:
  (r,) = [
    r
    for r in result["records"]
    if (r["policy"], r["sparsity"], r["mode"]) == (policy, sparsity, mode)
  ]
  return r


def test_records_have_the_fields(topk):
  _, result = topk
  assert [(r["policy"], r["sparsity"]) for r in result["records"]] == [
    ("dense", 0.0),
    ("informed", 0.0),
    ("informed", 0.5),
    ("random", 0.0),
    ("random", 0.5),
  ]
  for r in result["records"]:
    assert all(f in r for f in FIELDS), sorted(set(FIELDS) - set(r))
    assert r["tokens"] > 0 and np.isfinite(r["perplexity"])
    assert len(r["doc_nll"]) == len(result["documents"]) == 10
  dense = _rec(result, "dense", 0.0)
  assert dense["flops_fraction"] == 1.0 and dense["realized_sparsity"] == 0.0
  # Informed routing pays for forecasters and routers: in this tiny model they cost more
  # than what half the units save, which the FLOPs count must show.
  half = _rec(result, "informed", 0.5)
  assert half["ideal_flops_fraction"] <= half["flops_fraction"]


def test_sparsity_zero_equals_dense(topk):
  _, result = topk
  dense = _rec(result, "dense", 0.0)
  for policy in ("informed", "random"):
    r = _rec(result, policy, 0.0)
    assert r["perplexity"] == dense["perplexity"] and r["tokens"] == dense["tokens"]
    assert r["realized_sparsity"] == 0.0
  assert _rec(result, "informed", 0.5)["perplexity"] != dense["perplexity"]


def test_dense_matches_an_unrouted_forward_of_every_piece(topk, ckpt):
  """Independent of the packer and the routed path: each document piece run alone."""
  _, result = topk
  from ir_jax.api import load_model

  model = load_model(ckpt)
  tok = load_text_tokenizer("byte", None, True)  # configs/tiny.py: byte tokens, EOS per doc
  docs = [json.loads(l) for l in open(DOCS, encoding="utf-8")]
  ids = [tok.encode(d["text"]) for d in docs]
  stream = np.concatenate(ids)
  owner = np.concatenate([np.full(len(x), i) for i, x in enumerate(ids)])
  pieces = []  # (doc, tokens) cut at row ends (multiples of SEQ) and document ends
  for start in range(0, len(stream), SEQ):
    row, own = stream[start : start + SEQ], owner[start : start + SEQ]
    for d in np.unique(own):
      pieces.append((int(d), row[own == d]))
  pieces = [(d, p) for d, p in pieces if len(p) >= 2]
  padded = np.zeros((len(pieces), SEQ), np.int32)
  for i, (_, p) in enumerate(pieces):
    padded[i, : len(p)] = p  # causal: the right padding cannot change earlier logits
  logits = np.asarray(
    jax.jit(lambda t: nnx.merge(*nnx.split(model))(t))(jnp.asarray(padded)), np.float64
  )
  want = np.zeros(len(docs))
  count = np.zeros(len(docs), int)
  for i, (d, p) in enumerate(pieces):
    lg = logits[i, : len(p) - 1]
    logp = lg - lg.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want[d] -= logp[np.arange(len(p) - 1), p[1:]].sum()
    count[d] += len(p) - 1
  dense = _rec(result, "dense", 0.0)
  assert [d["tokens"] for d in result["documents"]] == count.tolist()
  np.testing.assert_allclose(dense["doc_nll"], want, rtol=1e-5)
  np.testing.assert_allclose(dense["perplexity"], np.exp(want.sum() / count.sum()), rtol=1e-5)
  assert [d["domain"] for d in result["documents"]] == [d["domain"] for d in docs]


def test_realized_sparsity_counts_real_tokens_only(topk):
  _, result = topk
  tok = load_text_tokenizer("byte", None, True)
  docs = tokenize_documents(((json.loads(l)["text"], "", "") for l in open(DOCS)), tok)
  full, tail = pack_documents(docs, SEQ)
  real = len(full) * SEQ + (tail.inputs.shape[1] if tail is not None else 0)
  # The last batch of full rows has padding rows (14 rows in batches of 4): they must
  # neither count as approximated nor take the real rows' k.
  assert len(full) % BATCH
  executed = len(full) * round(0.5 * SEQ) + (round(0.5 * tail.inputs.shape[1]) if tail else 0)
  for policy in ("informed", "random"):
    r = _rec(result, policy, 0.5)
    assert r["realized_sparsity"] == pytest.approx(1 - executed / real, abs=1e-9)
    assert r["sparsity_attn"] == pytest.approx(r["sparsity_mlp"], abs=1e-9)


def test_document_sparsity_adds_up_to_the_realized_sparsity(topk):
  """Per-document shares (counted per token) weighted by each document's token count (from
  the tokenizer) give the record's realized sparsity (counted per unit)."""
  _, result = topk
  tok = load_text_tokenizer("byte", None, True)
  real = np.asarray([len(tok.encode(json.loads(l)["text"])) for l in open(DOCS)], np.float64)
  for policy, sparsity in (("dense", 0.0), ("informed", 0.0), ("informed", 0.5), ("random", 0.5)):
    r = _rec(result, policy, sparsity)
    per = np.asarray(r["doc_sparsity"])
    assert per.shape == (len(result["documents"]),)
    assert (per >= 0).all() and (per <= 1).all()
    assert per @ real / real.sum() == pytest.approx(r["realized_sparsity"], abs=1e-9)
    if sparsity == 0.0:
      assert (per == 0).all()
  assert np.ptp(_rec(result, "informed", 0.5)["doc_sparsity"]) > 0  # documents differ


def test_document_records_feed_mix_perplexity(topk):
  _, result = topk
  domains, recs, losses, tokens = doc_losses(result)
  assert sorted(set(domains)) == ["news", "science", "story"]
  for r, row in zip(recs, losses):
    assert row.sum() / tokens.sum() == pytest.approx(r["nll"], rel=1e-9)
  mix = {"news": 0.4, "science": 0.3, "story": 0.3}  # the empirical mix of the 10 documents
  est = mix_perplexity(domains, losses, tokens, mix, method="self_normalized")
  np.testing.assert_allclose(est.perplexity, [r["perplexity"] for r in recs], rtol=1e-9)


def test_plot_and_table(topk, capsys):
  pytest.importorskip("matplotlib")
  out, _ = topk
  png = os.path.splitext(out)[0] + ".png"
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_causal_mode_calibrates_on_other_text(ckpt, tmp_path):
  result = run_eval(
    str(tmp_path / "causal.json"),
    "--model",
    ckpt,
    "--policy",
    "informed",
    "--sparsity",
    "0.5",
    "--mode",
    "causal",
    "--calibration-data",
    CALIB,
  )
  (r,) = result["records"]
  assert r["mode"] == "causal" and len(r["thresholds"]) == 2
  assert abs(r["realized_sparsity"] - 0.5) < 0.15  # calibrated elsewhere: close, not exact
  assert result["calibration"] == CALIB
  with pytest.raises(ConfigError, match="overlaps the evaluated text"):
    run_eval(
      str(tmp_path / "bad.json"),
      "--model",
      ckpt,
      "--policy",
      "informed",
      "--mode",
      "causal",
      "--calibration-data",
      DOCS,
    )


def test_user_errors(ckpt, tmp_path):
  with pytest.raises(FileNotFoundError, match="no run.json"):
    run_eval(str(tmp_path / "x.json"), "--workdir", ckpt)
  with pytest.raises(ConfigError, match="unknown policy"):
    run_eval(str(tmp_path / "x.json"), "--model", ckpt, "--policy", "smart")
  with pytest.raises(ConfigError, match="sparsity"):
    run_eval(str(tmp_path / "x.json"), "--model", ckpt, "--sparsity", "1.5")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "ir_jax.eval",
      "--config",
      CONFIG,
      "--model",
      ckpt,
      "--mode",
      "beam",
      "--json",
      str(tmp_path / "x.json"),
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=120,
  )
  assert p.returncode == 2
  assert p.stderr.strip().splitlines() == [
    "ir_jax.eval: error: unknown mode 'beam'; choose from topk,causal"
  ]
  assert not os.path.exists(tmp_path / "x.json")


# ------------------------------------------------------------- data shift (--target-mix)
def test_target_mix_equal_to_the_calibration_mix_reproduces_the_measured_curve(ckpt, tmp_path):
  # The 10 documents are 4 news, 3 science, 3 story: that mix gives weights of exactly 1.
  result = run_eval(
    str(tmp_path / "shift.json"),
    "--model",
    ckpt,
    "--policy",
    "informed,dense",
    "--sparsity",
    "0.5",
    "--target-mix",
    "news=4,science=3,story=3",
    "--target-mix",
    "news=1",
    "--estimator",
    "truncated,self_normalized,lr",
  )
  est = result["shift"]["estimates"]
  assert {e["method"] for e in est} == {"truncated", "self_normalized", "lr"}
  same = [e for e in est if e["target_mix"] == "news=4,science=3,story=3"]
  assert len(same) == 3 * 2  # 3 methods x (dense, informed 0.5)
  for e in same:
    assert e["perplexity"] == e["calibration_perplexity"], e
    assert e["truncated_frac"] == 0 and e["ess"] == pytest.approx(10)
  # news only, by hand from the per-document records: weights 2.5 on news, 0 elsewhere,
  # below the Ionides boundary sqrt(10) * mean(w) = 3.16, so nothing is truncated and
  # every ratio estimator is the news documents' pooled perplexity.
  news = [i for i, d in enumerate(result["documents"]) if d["domain"] == "news"]
  tok = sum(result["documents"][i]["tokens"] for i in news)
  for e in (e for e in est if e["target_mix"] == "news=1"):
    (r,) = [
      r for r in result["records"] if (r["policy"], r["sparsity"]) == (e["policy"], e["sparsity"])
    ]
    want = np.exp(sum(r["doc_nll"][i] for i in news) / tok)
    assert e["perplexity"] == pytest.approx(want, rel=1e-12)
    assert e["ess"] == pytest.approx(4) and e["truncated_frac"] == 0


def test_shift_cli_on_a_saved_result(topk, tmp_path, capsys):
  from ir_jax.eval import shift

  src, result = topk
  out = str(tmp_path / "est.json")
  assert (
    shift.main(
      [src, "--target-mix", "science=1,story=1", "--estimator", "truncated", "--json", out]
    )
    == 0
  )
  with open(out, encoding="utf-8") as f:
    est = json.load(f)
  assert est["format"] == "ir_jax.eval.shift/1"
  assert len(est["estimates"]) == len(result["records"])  # one mix x one method x settings
  # science and story, 3 documents each: weights 5/3 on both, no news.
  keep = [i for i, d in enumerate(result["documents"]) if d["domain"] != "news"]
  tok = sum(result["documents"][i]["tokens"] for i in keep)
  for e in est["estimates"]:
    (r,) = [
      r
      for r in result["records"]
      if (r["policy"], r["sparsity"], r["mode"]) == (e["policy"], e["sparsity"], e["mode"])
    ]
    assert e["perplexity"] == pytest.approx(
      np.exp(sum(r["doc_nll"][i] for i in keep) / tok), rel=1e-12
    )
  assert "target mix science=1,story=1" in capsys.readouterr().out
  if importlib.util.find_spec("matplotlib"):
    with open(os.path.splitext(out)[0] + ".png", "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_target_mix_errors_are_one_line_and_come_before_the_evaluation(ckpt, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  base = [
    sys.executable,
    "-m",
    "ir_jax.eval",
    "--config",
    CONFIG,
    "--model",
    ckpt,
    "--data",
    DOCS,
    "--json",
    str(tmp_path / "x.json"),
  ]
  for extra, msg in [
    (
      ["--target-mix", "news=1,wiki=1"],
      "--target-mix news=1,wiki=1: target_mix gives weight "
      "to domains ['wiki'] that have no calibration "
      "records",
    ),
    (
      ["--target-mix", "news=-1"],
      "--target-mix 'news=-1': weight of 'news' must be finite and >= 0, got -1",
    ),
    (["--target-mix", "news"], "--target-mix 'news': expected domain=weight,..., got 'news'"),
    (
      ["--target-mix", "news=1", "--estimator", "magic"],
      "--estimator 'magic': choose from lr,self_normalized,truncated,psis",
    ),
  ]:
    p = subprocess.run(base + extra, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f"ir_jax.eval: error: {msg}"), line
    assert "loaded" not in p.stdout  # refused before the model was loaded
  assert not os.path.exists(tmp_path / "x.json")


@pytest.mark.parametrize("data", ["nope.txt", "./held_out/", "~/missing.jsonl"])
def test_missing_data_file_is_named_not_taken_for_a_tfds_name(ckpt, tmp_path, data):
  with pytest.raises(FileNotFoundError) as info:
    main(
      ["--config", CONFIG, "--model", ckpt, "--data", data, "--json", str(tmp_path / "out.json")]
    )
  msg = str(info.value)
  assert msg.startswith(f"--data {data}: no such file") and "\n" not in msg
  assert not (tmp_path / "out.json").exists()


def test_model_without_config_uses_its_own_tokenizer(tmp_path):
  """No --config: the model's tokenizer, --data required; same records as a config whose
  data section names that tokenizer (written here, independent of the fallback)."""
  from ir_jax.data.tokenize import byte_tokenizer

  (tmp_path / "tok").mkdir()
  byte_tokenizer().save(str(tmp_path / "tok" / "tokenizer.json"))
  cfg = tiny_model_cfg()
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(init_model(cfg, seed=3))))
  ck = checkpoint.save(str(tmp_path / "tiny"), cfg, params, tokenizer_dir=str(tmp_path / "tok"))
  conf = tmp_path / "conf.py"
  conf.write_text(
    "import ml_collections\n\ndef get_config():\n"
    f"  return ml_collections.ConfigDict({{'data': {{'tokenizer': {ck!r}, "
    f"'files': [{DOCS!r}]}}}})\n"
  )
  common = [
    "--model",
    ck,
    "--data",
    DOCS,
    "--seq-len",
    str(SEQ),
    "--batch-size",
    str(BATCH),
    "--policy",
    "dense,informed",
    "--sparsity",
    "0.5",
    "--no-plot",
  ]
  assert main([*common, "--json", str(tmp_path / "a.json")]) == 0
  assert main([*common, "--config", str(conf), "--json", str(tmp_path / "b.json")]) == 0
  a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
  drop = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]
  assert drop(a["records"]) == drop(b["records"]) and a["tokenizer"] == b["tokenizer"] == ck
  assert a["config"] is None
  with pytest.raises(ConfigError, match="^--model without --config: name the held-out text"):
    main(["--model", ck, "--json", str(tmp_path / "c.json")])
  with pytest.raises(ConfigError, match="--calibration-data"):
    main([*common, "--mode", "causal", "--json", str(tmp_path / "c.json")])
  assert not (tmp_path / "c.json").exists()


def _settings(tmp_path, *argv: str):
  """The settings `python -m ir_jax.eval --json J ARGV` would evaluate (nothing loaded)."""
  args = parser().parse_args(["--json", str(tmp_path / "o.json"), *argv])
  return runner.check(runner.EvalRequest(**request_options(args)))


def test_default_settings_follow_the_runs_trained_budget(tmp_path):
  # No --sparsity, no --flops: a run trained for a FLOPs budget is evaluated at it alone ...
  (tmp_path / "run.json").write_text(json.dumps({"config": {"routing": {"flops": 0.6}}}))
  got = _settings(tmp_path, "--workdir", str(tmp_path), "--policy", "informed")
  assert [(s.policy, s.sparsity, s.flops) for s in got] == [("informed", 0.0, 0.6)]
  # ... one without a budget at sparsities 0.25, 0.4, 0.7 ...
  (tmp_path / "run.json").write_text(json.dumps({"config": {"routing": {}}}))
  got = _settings(tmp_path, "--workdir", str(tmp_path), "--policy", "informed,dense")
  assert [(s.policy, s.sparsity) for s in got] == [
    ("dense", 0.0),
    ("informed", 0.25),
    ("informed", 0.4),
    ("informed", 0.7),
  ]
  # ... and either flag given replaces both defaults.
  model = ("--model", str(tmp_path))
  got = _settings(
    tmp_path, *model, "--policy", "random", "--sparsity", "0.5", "--mode", "topk,causal"
  )
  assert [(s.mode, s.sparsity, s.flops) for s in got] == [("topk", 0.5, 0.0), ("causal", 0.5, 0.0)]
  got = _settings(tmp_path, *model, "--policy", "greedy", "--flops", "0.7")
  assert [(s.sparsity, s.flops) for s in got] == [(0.0, 0.7)]


def test_split_mode_cuts_a_text_file_into_paragraphs(ckpt, tmp_path, capsys):
  from ir_jax.data.config import SPLIT_MODES
  from ir_jax.eval.__main__ import SPLIT_MODES as CLI_SPLIT_MODES

  assert CLI_SPLIT_MODES == SPLIT_MODES
  paragraphs = [
    "The river rose in the night and the town woke to water in the streets.",
    "By noon the council had opened the school hall to the families who left.",
    "Engineers said the old levee held, and the water fell within two days.",
  ]
  txt = tmp_path / "notes.txt"
  txt.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
  common = ["--model", ckpt, "--policy", "dense", "--data", str(txt)]
  one = run_eval(str(tmp_path / "one.json"), *common, "--split-mode", "file")
  out = capsys.readouterr().out
  assert len(one["documents"]) == 1
  assert "evaluating 1 document (" in out and "--split-mode blank_lines" in out
  three = run_eval(str(tmp_path / "three.json"), *common, "--split-mode", "blank_lines")
  out = capsys.readouterr().out
  assert "evaluating 3 documents (" in out and "--split-mode blank_lines" not in out
  # each paragraph is its own document: scored tokens = its bytes less one, all alike
  got = [d["tokens"] for d in three["documents"]]
  assert [g - len(p.encode("utf-8")) for g, p in zip(got, paragraphs)] == [-1, -1, -1]
  assert sum(got) < one["documents"][0]["tokens"] + 3
