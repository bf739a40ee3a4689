"""launch/quality_table.py over ir_jax.experiments.quality: the plan and its commands, the
capped held-out sets, resuming (complete steps are skipped), and the report (table, plot,
JSON) from synthetic run files.

A real `--smoke` run starts 11 subprocesses of 5-35 s each (about 3 minutes on two busy
cores), more than a CI test may take; it runs when IR_JAX_QUALITY_SMOKE=1 is set.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import load_launcher

from ir_jax.experiments.quality.run import StepRunner

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "quality_table.py")
EVAL_DOCS = os.path.join(REPO, "tests", "data", "eval", "docs.jsonl")


@pytest.fixture(scope="module")
def qt():
  """The command (a thin driver), loaded by path."""
  return load_launcher("quality_table")


@pytest.fixture(scope="module")
def plan(qt):
  """ir_jax.experiments.quality.plan: arms, evaluations, steps and their completeness."""
  return importlib.import_module("ir_jax.experiments.quality.plan")


@pytest.fixture(scope="module")
def common(qt):
  """ir_jax.experiments.quality.common: file formats and JSON helpers."""
  return importlib.import_module("ir_jax.experiments.quality.common")


def _opts(qt, *argv: str):
  return qt.resolve(qt.parser().parse_args(list(argv)))


def _flags(argv: list[str]) -> dict[str, str]:
  return dict(a.split("=", 1) for a in argv if a.startswith("--config.") and "=" in a)


# ------------------------------------------------------------------ plan and commands
def test_default_plan_is_the_documented_experiment(qt, plan, tmp_path):
  opts = _opts(qt, "--runs", str(tmp_path / "runs"))
  assert opts.config.endswith("configs/smollm2_135m.py")
  assert opts.docs == os.path.join(REPO, "docs")
  names = [s.name for s in plan.steps(opts)]
  assert names[:3] == ["heldout_valid", "heldout_wiki", "train_forecaster"]
  arms = [n[len("train_") :] for n in names if n.startswith("train_")]
  assert arms == ["forecaster"] + [
    f"router_{p}_{s}" for s in ("0.25", "0.4", "0.7") for p in ("informed", "greedy")
  ]
  steps = {s.name: s for s in plan.steps(opts)}
  f = _flags(steps["train_forecaster"].argv)
  assert f["--config.train.stages"] == "forecaster"
  assert f["--config.train.forecaster.steps"] == "0"  # the closed-form fit alone
  assert f["--config.train.forecaster.fit_batches"] == "48"
  assert "--config.train.init_from" not in f
  r = _flags(steps["train_router_greedy_0.7"].argv)
  assert r["--config.train.stages"] == "router"
  assert r["--config.train.init_from"] == str(tmp_path / "runs" / "forecaster")
  assert (r["--config.routing.policy"], r["--config.routing.sparsity"]) == ("greedy", "0.7")
  assert (r["--config.train.router.steps"], r["--config.train.router.batch_size"]) == ("40", "2")
  assert r["--config.train.router.fit_batches"] == "16"
  # Every router arm: the same budget and seed; only policy and sparsity differ.
  budgets = {
    tuple(
      sorted(
        (k, v)
        for k, v in _flags(s.argv).items()
        if not k.startswith("--config.routing.") and k != "--config.train.seed"
      )
    )
    for n, s in steps.items()
    if n.startswith("train_router_")
  }
  assert len(budgets) == 1
  assert {
    _flags(s.argv)["--config.train.seed"] for n, s in steps.items() if n.startswith("train_")
  } == {"0"}
  ev = steps["eval_wiki_router_informed_0.4"].argv
  assert ev[ev.index("--policy") + 1] == "informed,random,oracle"
  assert ev[ev.index("--data") + 1].endswith("heldout/wiki.jsonl")
  assert ev[ev.index("--mode") + 1] == "topk"
  dense = steps["eval_valid_forecaster"].argv
  assert dense[dense.index("--policy") + 1] == "dense" and "--sparsity" not in dense
  assert (
    steps["heldout_wiki"]
    .argv[steps["heldout_wiki"].argv.index("--source") + 1]
    .endswith("assets/text/wiki/enwiki_articles.jsonl")
  )
  assert 40 * 60 <= plan.estimate(opts)["total"] <= 70 * 60  # the docstring's promise
  shown = plan.show(steps["train_forecaster"].argv)
  assert shown.startswith("python -m ir_jax.train --config configs/smollm2_135m.py")


def test_smoke_lora_causal_commands(qt, plan, tmp_path):
  runs = str(tmp_path / "r")
  opts = _opts(qt, "--smoke", "--runs", runs, "--lora", "--causal", "--sparsity", "0.25,0.7")
  assert opts.config.endswith("configs/tiny.py") and opts.docs == os.path.join(runs, "docs")
  steps = {s.name: s for s in plan.steps(opts)}
  lora = _flags(steps["train_lora_greedy_0.25"].argv)
  assert lora["--config.train.stages"] == "lora"
  assert lora["--config.train.init_from"] == os.path.join(runs, "router_greedy_0.25")
  assert lora["--config.routing.policy"] == "greedy"
  assert lora["--config.data.data_dir"] == os.path.join(runs, "tfds")  # nothing in the repo
  for name in ("eval_valid_lora_greedy_0.7", "eval_wiki_router_informed_0.25"):
    argv = steps[name].argv
    assert argv[argv.index("--mode") + 1] == "topk,causal"
  jobs = {(j.eval_set, j.arm): j for j in plan.eval_jobs(opts)}
  assert jobs["valid", "lora_greedy_0.7"].label == {"greedy": "greedy+lora"}
  assert jobs["wiki", "lora_informed_0.25"].label == {"informed": "informed+lora"}
  assert not any(s.done() for s in steps.values())
  assert qt.main(["--smoke", "--runs", runs, "--dry-run"]) == 0
  assert not os.path.exists(runs)  # a dry run writes nothing


def test_bad_options_are_refused(qt, tmp_path):
  for argv in (
    ["--policies", "informed,dense"],
    ["--sparsity", "0.4,1.5"],
    ["--router-steps", "-1"],
    ["--forecaster-fit-batches", "0"],
  ):
    with pytest.raises(SystemExit):
      _opts(qt, "--runs", str(tmp_path), *argv)


# ------------------------------------------------------------------ held-out sets
def test_heldout_set_is_capped_and_round_robin_over_domains(qt, plan, common, tmp_path):
  out = str(tmp_path / "h" / "set.jsonl")
  assert (
    qt.main(
      [
        "heldout",
        "--config",
        os.path.join(REPO, "configs", "tiny.py"),
        "--source",
        EVAL_DOCS,
        "--out",
        out,
        "--max-tokens",
        "400",
        "--doc-tokens",
        "48",
      ]
    )
    == 0
  )
  m = json.load(open(os.path.splitext(out)[0] + ".json"))
  assert m["format"] == common.HELDOUT_FORMAT
  assert plan.heldout_complete(os.path.splitext(out)[0] + ".json")
  lines = [json.loads(l) for l in open(out)]
  assert len(lines) == m["documents"] == len(m["items"])
  assert all(1 < i["tokens"] <= 48 for i in m["items"])
  assert 400 - 12 < m["tokens"] <= 400  # stops before a piece under doc_tokens / 4
  # File order is 4 news, 3 science, 3 story: taken in turn.
  assert [l["domain"] for l in lines[:6]] == ["news", "science", "story"] * 2
  src = [json.loads(l)["text"] for l in open(EVAL_DOCS)]
  for l in lines:  # prefixes of the source documents, cut at a word boundary
    assert any(s.startswith(l["text"]) for s in src)
  # --max-documents caps the count.
  assert (
    qt.main(
      [
        "heldout",
        "--config",
        os.path.join(REPO, "configs", "tiny.py"),
        "--source",
        EVAL_DOCS,
        "--domain",
        "mixed",
        "--out",
        out,
        "--max-tokens",
        "10000",
        "--doc-tokens",
        "1000",
        "--max-documents",
        "3",
      ]
    )
    == 0
  )
  lines = [json.loads(l) for l in open(out)]
  assert len(lines) == 3 and {l["domain"] for l in lines} == {"mixed"}


# ------------------------------------------------------------------ resuming and the report
PPL = {
  "dense": 10.0,
  "informed": 11.0,
  "informed+lora": 10.8,
  "greedy": 13.0,
  "greedy+lora": 12.0,
  "random": 14.0,
  "oracle": 10.5,
}
TRAIN_S = {"forecaster": 600.0, "router": 1200.0, "lora": 300.0}


def _fake_runs(qt, plan, common, runs: str, argv: list[str]) -> None:
  """Every step's output, as the real tools write it, with known numbers."""
  opts = _opts(qt, *argv)
  for name in ("valid", "wiki"):
    jsonl, manifest = plan.heldout_paths(opts, name)
    common.write_json(
      manifest,
      {
        "format": common.HELDOUT_FORMAT,
        "jsonl": jsonl,
        "source": name,
        "documents": 2,
        "tokens": 200,
        "doc_tokens": 128,
        "max_tokens": 256,
        "max_documents": 0,
        "domains": {name: {"documents": 2, "tokens": 200}},
      },
    )
    open(jsonl, "w").write('{"text": "x"}\n')
  for a in plan.arms(opts):
    wd = os.path.join(runs, a.name)
    for st, n in a.steps.items():
      os.makedirs(os.path.join(wd, "checkpoints", st, str(n)))
    common.write_json(
      os.path.join(wd, "run.json"),
      {
        "config": {
          "data": {"batch_size": 8, "seq_len": 64},
          "train": {st: {"batch_size": 0 if st == "forecaster" else 2} for st in a.stages},
        }
      },
    )
    common.write_json(
      os.path.join(wd, "train_summary.json"),
      {"stages": [{"stage": st, "train_s": TRAIN_S[st]} for st in a.stages]},
    )
  for job in plan.eval_jobs(opts):
    recs = []
    for p in job.policies:
      for mode in ("topk",) if p == "dense" else opts.modes:
        ppl = PPL[job.label[p]] * (1 + job.sparsity) * (1.1 if mode == "causal" else 1.0)
        if job.eval_set == "wiki":
          ppl *= 2
        nll = math.log(ppl)
        recs.append(
          {
            "mode": mode,
            "policy": p,
            "sparsity": job.sparsity,
            "perplexity": ppl,
            "nll": nll,
            "tokens": 198,
            "realized_sparsity": job.sparsity,
            "sparsity_attn": job.sparsity,
            "sparsity_mlp": job.sparsity,
            "flops_fraction": 1 - job.sparsity / 2,
            "ideal_flops_fraction": 0.5,
            "wall_s": 1.0,
            "doc_nll": [nll * 99, nll * 99],
          }
        )
    common.write_json(
      plan.eval_path(opts, job),
      {
        "records": recs,
        "documents": [{"domain": "a", "tokens": 99}, {"domain": "b", "tokens": 99}],
      },
    )


def _table(md: str) -> list[list[str]]:
  lines = md.split("## Results", 1)[1].split("![", 1)[0].splitlines()
  rows = [l for l in lines if l.startswith("| ")]
  return [[c.strip() for c in r.strip("|").split("|")] for r in rows[1:]]


def test_complete_steps_are_skipped_and_the_report_is_written(
  qt, plan, common, tmp_path, monkeypatch, capsys
):
  pytest.importorskip("matplotlib")
  runs, docs = str(tmp_path / "runs"), str(tmp_path / "docs")
  argv = ["--smoke", "--runs", runs, "--docs", docs, "--lora", "--sparsity", "0.25,0.4,0.7"]
  _fake_runs(qt, plan, common, runs, argv)

  def no_run(self, argv, log_path):
    raise AssertionError(f"ran {argv} although its output is complete")

  monkeypatch.setattr(StepRunner, "run", no_run)
  assert qt.main(argv) == 0
  out = capsys.readouterr().out
  assert out.count("complete, skipped") == len(plan.steps(_opts(qt, *argv))) == 41

  res = json.load(open(os.path.join(docs, "results.json")))
  assert res["format"] == common.RESULTS_FORMAT and res["git"]["commit"]
  assert res["commands"]["driver"].startswith("python launch/quality_table.py --smoke")
  assert len(res["commands"]["steps"]) == 41
  assert res["arms"]["router_informed_0.4"]["train_s"] == TRAIN_S["router"]
  assert res["arms"]["forecaster"]["batch"] == {"forecaster": [8, 64]}
  # 2 sets x (dense + 3 sparsities x (informed, informed+lora, random, oracle, greedy,
  # greedy+lora))
  assert len(res["records"]) == 2 * (1 + 3 * 6)
  rec = next(r for r in res["records"] if r["label"] == "informed" and r["sparsity"] == 0.4)
  assert rec["train_s"] == TRAIN_S["router"] + TRAIN_S["forecaster"]
  assert rec["by_domain"]["a"]["perplexity"] == pytest.approx(rec["perplexity"])
  greedy = next(r for r in res["records"] if r["label"] == "greedy")
  assert greedy["train_s"] == TRAIN_S["router"]  # greedy routers do not need forecasters
  lora = next(r for r in res["records"] if r["label"] == "greedy+lora")
  assert lora["train_s"] == TRAIN_S["router"] + TRAIN_S["lora"]
  ilora = next(r for r in res["records"] if r["label"] == "informed+lora")
  assert ilora["train_s"] == TRAIN_S["router"] + TRAIN_S["lora"] + TRAIN_S["forecaster"]

  md = open(os.path.join(docs, "results.md")).read()
  rows = _table(md)
  assert len(rows) == 1 + 3 * 6
  assert {(r[0], r[1]) for r in rows[1:]} == {
    (p, s)
    for p in ("informed", "informed+lora", "greedy", "greedy+lora", "random", "oracle")
    for s in ("0.25", "0.4", "0.7")
  }
  assert rows[0][:4] == ["dense", "0", "10.00", "20.00"]
  inf = next(r for r in rows if r[:2] == ["informed", "0.4"])
  assert inf[2].startswith("15.40 (1.54×)") and inf[3].startswith("30.80 (1.54×)")
  assert inf[4] == "0.400 / 0.400" and inf[5] == "0.800"
  assert "routers 20.0 min" in inf[6] and "forecasters 10.0 min" in inf[6]
  assert os.path.getsize(os.path.join(docs, "results.png")) > 10_000
  assert "## Reading" in md and "To be written from the numbers" in md
  assert res["git"]["commit"] in md and "python -m ir_jax.eval" in md

  # --report-only from results.json alone (no runs directory): the same page.
  only = str(tmp_path / "only")
  os.makedirs(only)
  with open(os.path.join(only, "results.json"), "w") as f:
    json.dump(res, f)
  assert qt.main(["--report-only", "--runs", str(tmp_path / "none"), "--docs", only]) == 0
  assert _table(open(os.path.join(only, "results.md")).read()) == rows
  assert os.path.isfile(os.path.join(only, "results.png"))

  # Incomplete outputs are redone; other budgets in the same runs directory are refused.
  opts = _opts(qt, *argv)
  steps = {s.name: s for s in plan.steps(opts)}
  os.rmdir(os.path.join(runs, "router_greedy_0.4", "checkpoints", "router", "2"))
  os.makedirs(os.path.join(runs, "router_greedy_0.4", "checkpoints", "router", "1"))
  assert not steps["train_router_greedy_0.4"].done()
  os.remove(
    plan.eval_path(
      opts,
      next(
        j for j in plan.eval_jobs(opts) if j.arm == "router_informed_0.7" and j.eval_set == "wiki"
      ),
    )
  )
  assert not steps["eval_wiki_router_informed_0.7"].done()
  causal = {s.name: s for s in plan.steps(_opts(qt, *argv, "--causal"))}
  assert not causal["eval_valid_router_greedy_0.25"].done()  # its JSON has no causal records
  assert causal["eval_valid_forecaster"].done()  # dense is top-k only
  with pytest.raises(SystemExit, match="router_steps 2 vs 5"):
    qt.main([*argv, "--router-steps", "5"])


# ------------------------------------------------------------------ the real smoke run
@pytest.mark.skipif(
  not os.environ.get("IR_JAX_QUALITY_SMOKE"),
  reason="about 3 minutes; set IR_JAX_QUALITY_SMOKE=1 to run --smoke end to end",
)
def test_smoke_run_end_to_end_then_resume(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  cmd = [
    sys.executable,
    SCRIPT,
    "--smoke",
    "--runs",
    str(tmp_path / "runs"),
    "--docs",
    str(tmp_path / "docs"),
  ]
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout + p.stderr
  assert len([l for l in p.stdout.splitlines() if l.startswith("[")]) == 11
  md = open(tmp_path / "docs" / "results.md").read()
  assert len(_table(md)) == 1 + 4  # dense + informed, greedy, random, oracle at 0.4
  assert os.path.isfile(tmp_path / "docs" / "results.png")
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and again.stdout.count("complete, skipped") == 11
