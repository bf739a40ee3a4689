"""Classifier density ratios and the target-document estimates of ir_jax.eval.shift: a known
ratio between two Gaussians, unit weights when nothing shifts, hashed features by hand, and
the command line on unlabeled target documents."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from ir_jax.base_error import IrJaxError
from ir_jax.config import ConfigError
from ir_jax.eval import shift
from ir_jax.eval.density_ratio import classifier_weights, text_features
from ir_jax.eval.estimator_inputs import EstimatorError
from ir_jax.eval.importance_weights import METHODS
from ir_jax.eval.lr_estimates import target_perplexity


# ------------------------------------------------ classifier weights, known ratio
@pytest.mark.parametrize("seed", [0, 1])
def test_classifier_recovers_the_ratio_of_two_gaussians(seed):
  # A = N(0, 1), B = N(1, 1): log p_B(x) / p_A(x) = x - 1/2 exactly, and a logistic
  # regression on x can represent it. Tolerances from seeds 0-9 of this setup: median
  # |log error| at most 0.071, max over |x| < 2 at most 0.27, |mean w - 1| at most 0.021.
  rng = np.random.default_rng(seed)
  xa = rng.normal(size=(2000, 1))
  xb = rng.normal(1.0, 1.0, size=(2000, 1))
  dr = classifier_weights(xa, xb, seed=seed)
  err = np.log(dr.weights) - (xa[:, 0] - 0.5)
  assert np.median(np.abs(err)) < 0.1
  assert np.abs(err[np.abs(xa[:, 0]) < 2]).max() < 0.35
  assert abs(dr.weights.mean() - 1) < 0.05
  assert dr.weights.shape == (2000,) and dr.target_weights.shape == (2000,)
  # the target side: w is largest where B has most mass beyond A
  assert np.corrcoef(np.log(dr.target_weights), xb[:, 0])[0, 1] > 0.99
  assert 0.7 < dr.auc < 0.85  # the Bayes AUC of N(0,1) vs N(1,1) is Phi(1/sqrt 2) = 0.760


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_samples_of_one_distribution_give_weights_near_one(seed):
  # 20 seeds of this setup: ESS / n at least 0.927.
  rng = np.random.default_rng(seed)
  w = classifier_weights(rng.normal(size=(300, 3)), rng.normal(size=(300, 3)), seed=seed).weights
  assert w.sum() ** 2 / (w * w).sum() >= 0.9 * len(w)


DOCS = [
  ("news", "The council voted on Tuesday to raise the budget for road repairs by ten percent."),
  ("news", "Shares fell sharply after the company reported lower profits for the quarter."),
  ("news", "The minister said the new rules would take effect at the start of next year."),
  ("news", "Police closed the bridge for several hours after a lorry overturned in the rain."),
  ("news", "The election results will be announced on Friday, officials said in a statement."),
  ("news", "Rail workers began a strike over pay, disrupting services across the region."),
  ("code", "def add(a, b):\n    return a + b  # returns the sum of a and b"),
  ("code", "for i in range(10):\n    print(i * i)"),
  ("code", "import os\npath = os.path.join(root, name)\nif os.path.exists(path): pass"),
  ("code", "class Stack:\n    def push(self, x):\n        self.items.append(x)"),
  ("code", "with open(fn) as f:\n    data = json.load(f)"),
  ("code", "x = [v for v in values if v is not None]\nreturn sorted(x)"),
]


def test_the_same_documents_give_weights_one_and_the_pools_own_perplexity():
  texts = [t for _, t in DOCS]
  feats = text_features(texts)
  dr = classifier_weights(feats, feats.copy())
  np.testing.assert_array_equal(dr.weights, 1.0)  # the classifier cannot tell them apart
  assert dr.auc == 0.5 and dr.calibration == (0.0, 0.0)
  rng = np.random.default_rng(0)
  tok = rng.integers(10, 40, size=len(texts)).astype(float)
  nll = tok * rng.uniform(2, 4, size=(2, len(texts)))  # two settings
  own = np.exp(nll.sum(1) / tok.sum())
  for m in METHODS:
    if m == "psis":
      continue  # psis needs >= 25 documents
    got = target_perplexity(nll, tok, dr.weights, m, n_target=len(texts))
    np.testing.assert_allclose(got.perplexity, own, rtol=1e-9)
    assert np.all(got.pred_low < own) and np.all(own < got.pred_high)


def test_text_features_by_hand():
  # "a b a": unigrams a x2, b x1; bigrams "a b", "b a" once each. Four distinct buckets
  # (checked: no collision at dim 4096), values log(1 + count) up to a hash sign, unit norm.
  (row,) = text_features(["A b a"])
  nz = np.sort(np.abs(row[row != 0]))
  want = np.sort([math.log(3), math.log(2), math.log(2), math.log(2)])
  np.testing.assert_allclose(nz, want / np.linalg.norm(want), rtol=1e-12)
  np.testing.assert_array_equal(text_features(["A b a"]), text_features(["a B A"]))


def test_classifier_errors_are_one_line():
  with pytest.raises(EstimatorError, match="same d"):
    classifier_weights(np.zeros((5, 2)), np.zeros((5, 3)))
  with pytest.raises(EstimatorError, match="at least 2 documents on each side"):
    classifier_weights(np.zeros((5, 2)), np.zeros((1, 2)))
  with pytest.raises(EstimatorError, match="finite"):
    classifier_weights(np.full((5, 2), np.nan), np.zeros((5, 2)))


def test_identical_rows_that_empty_a_fold_are_a_clear_error():
  # Every row the same (or one row per side): identical rows share a fold, so one fold
  # holds every document and leaves nothing to fit on; once a bare numpy ValueError.
  for calib, target in (
    (np.ones((10, 3)), np.ones((10, 3))),
    (np.ones((10, 3)), np.full((6, 3), 2.0)),
  ):
    with pytest.raises(IrJaxError, match="fold 0 leaves none to fit on") as e:
      classifier_weights(calib, target)
    assert isinstance(e.value, EstimatorError)
    msg = str(e.value)
    assert "\n" not in msg and "give more distinct documents" in msg


# ------------------------------------------------ the command line on target documents
def _result(tmp_path) -> tuple[str, dict]:
  """A saved ir_jax.eval result over DOCS (read from a JSONL the sources name)."""
  data = tmp_path / "calib.jsonl"
  with open(data, "w", encoding="utf-8") as f:
    for d, t in DOCS:
      f.write(json.dumps({"text": t, "domain": d}) + "\n")
  read = shift.read_documents(str(data))
  rng = np.random.default_rng(1)
  tok = [int(x) for x in rng.integers(10, 40, size=len(DOCS))]
  base = np.array([3.0 if d == "news" else 1.5 for d, _ in DOCS])

  def rec(policy, sparsity, extra):
    nll = (base + extra) * np.array(tok)
    return {
      "mode": "topk",
      "policy": policy,
      "sparsity": sparsity,
      "realized_sparsity": sparsity,
      "perplexity": float(np.exp(nll.sum() / sum(tok))),
      "doc_nll": nll.tolist(),
      # news routes harder than the rest: the target's mix moves the expected sparsity
      "doc_sparsity": [min(1.0, sparsity * (1.4 if d == "news" else 0.8)) for d, _ in DOCS],
    }

  result = {
    "format": "ir_jax.eval/1",
    "documents": [{"domain": d, "source": src, "tokens": n} for (_, d, src), n in zip(read, tok)],
    "records": [rec("dense", 0.0, 0.0), rec("informed", 0.5, 0.7)],
  }
  path = tmp_path / "calib.json"
  path.write_text(json.dumps(result), encoding="utf-8")
  return str(path), result


def test_shift_cli_on_the_evaluated_documents_reproduces_their_perplexity(tmp_path, capsys):
  src, result = _result(tmp_path)
  out = str(tmp_path / "est.json")
  code = shift.main(
    [src, "--target-docs", str(tmp_path / "calib.jsonl"), "--estimator", "lr,truncated"]
    + ["--json", out, "--no-plot"]
  )
  assert code == 0
  with open(out, encoding="utf-8") as f:
    est = json.load(f)
  (wt,) = est["weights"]
  np.testing.assert_array_equal(wt["values"], 1.0)
  assert len(est["estimates"]) == 2 * 2  # two methods x (dense, informed 0.5)
  for e in est["estimates"]:
    assert e["perplexity"] == pytest.approx(e["calibration_perplexity"], rel=1e-9)
    assert e["low"] < e["perplexity"] < e["high"]
  assert "classifier AUC" in capsys.readouterr().out


def test_shift_cli_on_a_directory_of_code_documents(tmp_path):
  # Unlabeled targets that look like the code documents: the estimate moves from the
  # calibration perplexity towards the code documents' perplexity, with fewer effective docs.
  src, result = _result(tmp_path)
  target = tmp_path / "deploy"
  target.mkdir()
  snippets = [
    "def mul(a, b):\n    return a * b",
    "for k in range(3):\n    print(k)",
    "import json\nwith open(p) as f:\n    x = json.load(f)",
    "class Queue:\n    def pop(self):\n        return self.items.pop()",
    "y = [v for v in xs if v]\nreturn sorted(y)",
    "if os.path.exists(path):\n    os.remove(path)",
  ]
  for i, t in enumerate(snippets):
    (target / f"{i}.txt").write_text(t, encoding="utf-8")
  args = shift.argparse.Namespace(
    target_mix=[],
    target_docs=[str(target)],
    calib_docs=None,
    estimator="self_normalized",
    tau="ionides",
    tau_c=1.0,
    tau_beta=0.5,
  )
  est = shift.from_args(result, args)
  tok = np.array([d["tokens"] for d in result["documents"]], float)
  code = np.array([d["domain"] == "code" for d in result["documents"]])
  for e in est["estimates"]:
    (r,) = [r for r in result["records"] if r["policy"] == e["policy"]]
    nll = np.array(r["doc_nll"])
    code_ppl = math.exp(nll[code].sum() / tok[code].sum())
    assert code_ppl < e["perplexity"] < e["calibration_perplexity"]
    assert e["ess"] < len(DOCS)
  assert est["weights"][0]["auc"] > 0.5


def test_shift_cli_errors(tmp_path):
  src, _ = _result(tmp_path)
  with pytest.raises(ConfigError, match="--target-mix domain=weight,... or --target-docs"):
    shift.main([src])
  other = tmp_path / "other.jsonl"
  other.write_text(json.dumps({"text": "one document"}) + "\n", encoding="utf-8")
  with pytest.raises(ConfigError, match="1 documents, but the result evaluated 12"):
    shift.main([src, "--target-docs", str(other), "--calib-docs", str(other)])
  with pytest.raises(FileNotFoundError, match="no such file or directory"):
    shift.main([src, "--target-docs", str(tmp_path / "missing")])
  os.remove(tmp_path / "calib.jsonl")
  with pytest.raises(ConfigError, match="give their texts with --calib-docs"):
    shift.main([src, "--target-docs", str(other)])


def test_expected_sparsity_on_target_documents_is_the_weighted_share(tmp_path):
  """The realized sparsity to expect on B: the documents' approximated shares weighted by
  density ratio x tokens, by hand from the weights the command reports."""
  src, result = _result(tmp_path)
  target = tmp_path / "news_like.jsonl"
  with open(target, "w", encoding="utf-8") as f:
    for d, t in DOCS:
      if d == "news":
        f.write(json.dumps({"text": t}) + "\n")
  out = str(tmp_path / "est.json")
  code = shift.main([src, "--target-docs", str(target), "--estimator", "lr", "--json", out])
  assert code == 0
  with open(out, encoding="utf-8") as f:
    est = json.load(f)
  (wt,) = est["weights"]
  w = np.asarray(wt["values"])
  tok = np.asarray([d["tokens"] for d in result["documents"]], np.float64)
  for e in est["estimates"]:
    (r,) = [r for r in result["records"] if r["policy"] == e["policy"]]
    share = np.asarray(r["doc_sparsity"])
    assert e["est_realized_sparsity"] == pytest.approx((w * tok) @ share / (w * tok).sum())
    assert e["est_realized_sparsity_se"] >= 0
  informed = next(e for e in est["estimates"] if e["policy"] == "informed")
  plain = next(r for r in result["records"] if r["policy"] == "informed")
  pool = tok @ np.asarray(plain["doc_sparsity"]) / tok.sum()
  assert informed["est_realized_sparsity"] > pool  # a news-like target routes harder
