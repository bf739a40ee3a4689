"""ir_jax.experiments.shift (launch/shift_experiment.py): reading the evaluations, drawing
disjoint pools, the verdicts, and one small end-to-end run through the driver."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import load_launcher

from ir_jax.experiments.shift import trials

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = {
  "news": "market shares rose as the minister announced budget talks".split(),
  "code": "def return import class self lambda yield pass".split(),
}


def _write_set(root, name: str, domains: list[str], nll: dict[str, list[float]], tokens):
  """A held-out JSONL and one eval JSON (dense + an informed arm at a FLOPs budget)."""
  os.makedirs(root / "heldout", exist_ok=True)
  rng = np.random.default_rng(len(domains))
  with open(root / "heldout" / f"{name}.jsonl", "w", encoding="utf-8") as f:
    for d in domains:
      text = " ".join(rng.choice(WORDS[d], 30))
      f.write(json.dumps({"text": text, "domain": d}) + "\n")
  records = [
    {"mode": "topk", "policy": "dense", "sparsity": 0.0, "doc_nll": nll["dense"]},
    {"mode": "topk", "policy": "informed", "flops_budget": 0.6, "doc_nll": nll["informed"]},
    {"mode": "causal", "policy": "informed", "sparsity": 0.4, "doc_nll": [0.0] * len(domains)},
  ]
  documents = [{"domain": d, "tokens": t} for d, t in zip(domains, tokens)]
  os.makedirs(root / "eval" / name, exist_ok=True)
  with open(root / "eval" / name / "router_informed_0.6.json", "w", encoding="utf-8") as f:
    json.dump({"records": records, "documents": documents}, f)


def test_load_keeps_topk_settings_dense_first_and_concatenates_sets(tmp_path):
  _write_set(
    tmp_path, "a", ["news", "code"], {"dense": [1.0, 2.0], "informed": [3.0, 4.0]}, [10, 20]
  )
  _write_set(tmp_path, "b", ["code"], {"dense": [5.0], "informed": [6.0]}, [30])
  data = trials.load(str(tmp_path / "eval"), str(tmp_path / "heldout"), ["a", "b"])
  assert data["settings"] == ["dense", "informed 0.6"]  # causal records are not read
  np.testing.assert_array_equal(data["nll"], [[1.0, 2.0, 5.0], [3.0, 4.0, 6.0]])
  np.testing.assert_array_equal(data["tokens"], [10, 20, 30])
  assert list(data["domains"]) == ["news", "code", "code"] and len(data["texts"]) == 3


def test_load_refuses_an_eval_of_other_documents(tmp_path):
  _write_set(tmp_path, "a", ["news", "code"], {"dense": [1, 2], "informed": [3, 4]}, [1, 1])
  with open(tmp_path / "heldout" / "a.jsonl", "w", encoding="utf-8") as f:
    f.write(json.dumps({"text": "x", "domain": "code"}) + "\n")
    f.write(json.dumps({"text": "y", "domain": "news"}) + "\n")
  with pytest.raises(SystemExit, match="documents differ"):
    trials.load(str(tmp_path / "eval"), str(tmp_path / "heldout"), ["a"])


def test_draw_gives_disjoint_pools_of_the_asked_counts():
  domains = np.array(["x"] * 5 + ["y"] * 4)
  ia, ib = trials.draw(np.random.default_rng(0), domains, {"x": 2, "y": 1}, {"x": 3, "y": 2})
  assert sorted(domains[ia]) == ["x", "x", "y"] and sorted(domains[ib]) == ["x"] * 3 + ["y"] * 2
  assert not set(ia) & set(ib)
  with pytest.raises(SystemExit, match="needs 5 'y' documents, have 4"):
    trials.draw(np.random.default_rng(0), domains, {"y": 3}, {"y": 2})


def test_verdicts_compare_truncated_with_lr():
  res = {
    "heavy": {
      "heavy_tailed": True,
      "methods": {
        "lr": {"rmse": [0.4, 0.2], "coverage": [1.0, 0.5]},
        "truncated": {"rmse": [0.1, 0.1], "coverage": [1.0, 1.0]},
      },
    },
    "light": {"heavy_tailed": False, "methods": {"lr": {"rmse": [0.1], "coverage": [1.0]}}},
  }
  v = trials.verdicts(res)
  assert list(v) == ["heavy"]  # no truncated estimates: no verdict
  assert v["heavy"]["rmse_lr"] == pytest.approx(0.3) and v["heavy"]["rmse_truncated"] == 0.1
  assert v["heavy"]["truncated_at_most_lr"] and v["heavy"]["truncated_at_most_half_lr"]
  assert v["heavy"]["coverage"] == {"lr": 0.75, "truncated": 1.0}


def test_driver_writes_the_page_for_a_small_scenario(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  domains = ["news"] * 12 + ["code"] * 12
  tokens = rng.integers(20, 40, len(domains)).tolist()
  # NLL per token: news 2.0, code 3.0 (dense); the routed arm 10 % worse.
  per_tok = np.where(np.array(domains) == "news", 2.0, 3.0)
  dense = (per_tok * np.array(tokens)).tolist()
  _write_set(
    tmp_path, "valid", domains, {"dense": dense, "informed": [1.1 * x for x in dense]}, tokens
  )
  monkeypatch.setattr(
    trials, "SCENARIOS", {"code only": ({"news": 6, "code": 4}, {"code": 6}, False)}
  )
  mod = load_launcher("shift_experiment")
  docs = tmp_path / "docs"
  argv = ["--eval", str(tmp_path / "eval"), "--heldout", str(tmp_path / "heldout")]
  assert mod.main([*argv, "--sets", "valid", "--resamples", "3", "--docs", str(docs)]) == 0
  out = json.load(open(docs / "shift.json"))
  assert out["settings"] == ["dense", "informed 0.6"] and out["resamples"] == 3
  assert out["documents"] == {"code": 12, "news": 12}
  truth = out["scenarios"]["code only"]["measured_median"]
  # B holds code documents only: measured perplexity is exp(3.0), and exp(3.3) routed.
  np.testing.assert_allclose(truth, [np.exp(3.0), np.exp(3.3)], rtol=1e-12)
  assert "| code only |" in (docs / "shift.md").read_text()
