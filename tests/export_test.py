"""Export (`python -m ir_jax.convert export`) to HuggingFace and the reference layout, and back.

What is checked against what:
  hf round trip   transformers' LlamaForCausalLM on the export vs ir_jax's own
                  forward with LoRA unmerged (1e-4); the re-imported model's routed
                  logits vs the original's (LoRA merged) at every policy, sparsity and
                  mode, bitwise; routing tensors bitwise vs the workdir's
  reference       key names and shapes vs the layout table written out below (the
                  README's), values vs our tensors transposed, the reference router's
                  execute probability vs sigmoid(our score) computed by torch modules;
                  reloading gives the forecasters and routers back bitwise
  sharded, tied   transformers on the export vs transformers on the original HF dir, bitwise
  bad input       in-progress checkpoints and workdirs, a non-empty --out, an export
                  that fails midway (disk full): one-line errors, nothing complete-looking left
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_HF_CONFIGS, save_tiny_hf, tiny_llama_config
from flax import nnx

import ir_jax
from ir_jax import checkpoint, convert
from ir_jax import routing as R
from ir_jax.config import LlamaConfig
from ir_jax.convert import export as ex
from ir_jax.convert import routing_io
from ir_jax.convert.__main__ import main
from ir_jax.convert.safetensors_io import SafetensorsFile
from ir_jax.errors import cli_main
from ir_jax.routing import RoutingSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEWS = os.path.join(REPO, "assets", "text", "news", "lee.cor")
POLICIES = ("informed", "greedy", "random", "oracle", "dense")
SPARSITIES = (0.25, 0.4, 0.7)


def _tiny_settings(data_dir: str, base: str):
  from ir_jax.train import settings_from_config

  spec = importlib.util.spec_from_file_location(
    "tiny_cfg", os.path.join(REPO, "configs", "tiny.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.model.checkpoint = base
  cfg.data.files = (NEWS,)
  cfg.data.data_dir = data_dir
  cfg.mesh.data = 1
  cfg.data.batch_size = 4
  cfg.train.stages = "forecaster,router,lora"
  cfg.train.log_every = 1
  cfg.train.checkpoint_every = 100
  cfg.train.eval_batches = 0
  cfg.train.forecaster.steps = 2
  cfg.train.router.steps = 2
  cfg.train.lora.steps = 2
  # A large LoRA step, so the merged update moves logits far more than the
  # 1e-4 tolerance of the transformers comparison (a wrong merge would show).
  cfg.train.lora.learning_rate = 0.05
  cfg.train.lora.warmup = 0.0
  return settings_from_config(cfg)


def _random_params(cfg: LlamaConfig, seed: int) -> dict:
  """Random weights (numpy, no compile); norms around 1, forecasters untrained-small."""
  rng = np.random.RandomState(seed)
  out = {}
  for path, a in jax.tree_util.tree_flatten_with_path(convert.abstract_params(cfg))[0]:
    k = "/".join(p.key for p in path)
    scale = 0.1 if "norm" in k else (1e-3 if "lff" in k else 0.02)
    v = scale * rng.randn(*a.shape) + (1.0 if "norm" in k else 0.0)
    out[k] = (np.zeros(a.shape) if "threshold" in k else v).astype(a.dtype)
  return _unflat(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny workdir trained a few steps through the forecaster, router and LoRA stages,
  on base weights from an ir_jax checkpoint (with a tokenizer.json), on one device."""
  if not os.path.exists(NEWS):
    pytest.skip("demo assets missing: run `bash launch/fetch_assets.sh`")
  import tokenizers

  from ir_jax.train import run

  root = tmp_path_factory.mktemp("export")
  tok_dir = root / "tok"
  tok_dir.mkdir()
  tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
    str(tok_dir / "tokenizer.json")
  )
  s = _tiny_settings(str(root / "tfds"), str(root / "base"))
  checkpoint.save(
    str(root / "base"),
    s.model.replace(lora_rank=0),
    _random_params(s.model.replace(lora_rank=0), 0),
    tokenizer_dir=str(tok_dir),
  )
  summary = run(s, str(root / "work"), devices=jax.devices()[:1])
  final = jax.tree.map(np.asarray, nnx.to_pure_dict(summary["state"].state))
  return dict(workdir=str(root / "work"), settings=s, root=root, final=final)


def _tokens(vocab: int, shape=(2, 24), seed=0) -> jax.Array:
  return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


def _pure(module) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def _unflat(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for k, v in flat.items():
    node = out
    *path, last = k.split("/")
    for p in path:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def _cli_error(capsys, *argv: str) -> str:
  """Runs the CLI in-process; asserts a one-line user error (exit 2) and returns it."""
  with pytest.raises(SystemExit) as e:
    cli_main(lambda: main(list(argv)), "ir_jax.convert")
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2, err
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith("ir_jax.convert: error: ")
  return err


def _no_partial(parent: str) -> None:
  assert not [n for n in os.listdir(parent) if ".partial-" in n]


def _all_routed(model, specs: tuple[RoutingSpec, ...], tokens: jax.Array) -> np.ndarray:
  """Logits `[len(specs), B, T, V]` for every spec, compiled once per graph (both models
  of a comparison share it, so this costs one compile, not one per spec)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_routed_fn(graphdef, specs)(state, tokens))


_ROUTED_CACHE: dict = {}


def _routed_fn(graphdef, specs):
  if (graphdef, specs) not in _ROUTED_CACHE:

    def f(state, tokens):
      m = nnx.merge(graphdef, state)
      return jnp.stack([m(tokens, routing=rs) for rs in specs])

    _ROUTED_CACHE[graphdef, specs] = jax.jit(f)
  return _ROUTED_CACHE[graphdef, specs]


# ------------------------------------------------------------------- hf
def test_hf_round_trip(trained, tmp_path):
  work, final = trained["workdir"], trained["final"]
  out = str(tmp_path / "hf")
  assert main(["export", work, "--out", out]) == 0
  assert {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "routing.json",
    "routing.safetensors",
    "tokenizer.json",
  } <= set(os.listdir(out))
  assert (
    open(os.path.join(out, "tokenizer.json")).read()
    == open(trained["root"] / "base" / "tokenizer.json").read()
  )
  _no_partial(str(tmp_path))
  manifest = json.load(open(os.path.join(out, "routing.json")))
  spec = trained["settings"].routing
  assert manifest["layout"] == "ir_jax" and manifest["lora"]["merged"]
  assert manifest["thresholds"]["calibrated"]
  assert routing_io.load_spec(out) == spec
  assert manifest["source"]["stage"] == "lora" and manifest["source"]["step"] == 2
  # The router stage left a per-unit capacity table with the target mean sparsity; the
  # export carries it (tensor and routing.json) and the import brings it back unchanged.
  table = np.asarray(final["routing"]["capacity"], np.float64)
  assert ((table >= 0) & (table <= 1)).all()
  assert (1 - table).mean() == pytest.approx(spec.sparsity, abs=1e-6)
  assert len({float(v) for v in table.ravel()}) > 1  # not uniform
  np.testing.assert_allclose(np.asarray(manifest["capacity_table"]["values"]), table, atol=1e-7)

  # What export restores is what training ended with, bitwise.
  t = ex.open_trained(work)
  leaves = ex.Leaves(t.params)  # base weights come from disk one at a time
  flat_final = _flat(final)
  assert (
    set(
      jax.tree_util.keystr(p, simple=True, separator="/")
      for p, _ in jax.tree_util.tree_flatten_with_path(t.params)[0]
    )
    == flat_final.keys()
  )
  for k, v in flat_final.items():
    np.testing.assert_array_equal(np.asarray(leaves.get(tuple(k.split("/")))), v, err_msg=k)

  # transformers on the export == our forward with LoRA applied unmerged.
  cfg = t.config
  assert cfg.lora_rank == 4
  tokens = _tokens(257)
  ours = np.asarray(convert.model_from_params(cfg, final)(tokens))
  hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.tensor(np.asarray(tokens))).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  # ... and the LoRA update is far from negligible, so a wrong merge would show.
  no_lora = {k: v for k, v in _flat(final).items() if "_lora/" not in k}
  base_only = convert.model_from_params(cfg.replace(lora_rank=0), _unflat(no_lora))
  assert np.abs(np.asarray(base_only(tokens)) - theirs).max() > 1e-2

  # Re-imported, the routed model is the original (LoRA merged) bit for bit, at
  # every policy and sparsity in top-k mode and at the trained capacity causally.
  imported = ir_jax.load_model(out)
  merged_cfg, merged_params = ex.merge_lora(cfg, final)
  merged = convert.model_from_params(merged_cfg, merged_params)
  assert imported.config == merged.config
  got = _flat(_pure(imported))
  assert got.keys() == _flat(merged_params).keys()
  for k, v in _flat(merged_params).items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  specs = tuple(RoutingSpec(policy=p, sparsity=s) for p in POLICIES for s in SPARSITIES)
  specs += (RoutingSpec(policy="informed", sparsity=spec.sparsity, mode="causal"),)
  a, b = _all_routed(imported, specs, tokens), _all_routed(merged, specs, tokens)
  for i, rs in enumerate(specs):
    np.testing.assert_array_equal(a[i], b[i], err_msg=str(rs))
  assert len({a[i].tobytes() for i in range(len(specs))}) > len(specs) // 2  # policies differ

  # `import` turns the export into a checkpoint with the same routed model and spec.
  ckpt = str(tmp_path / "ckpt")
  assert main(["import", out, "--out", ckpt]) == 0
  assert routing_io.load_spec(ckpt) == spec
  for m in (imported, ir_jax.load_model(ckpt)):  # evaluation routes with the same table
    np.testing.assert_allclose(np.asarray(R.trained_spec(m, spec).capacities), table, atol=1e-7)
  np.testing.assert_array_equal(_all_routed(ir_jax.load_model(ckpt), specs, tokens), a)


def test_sharded_tied_export_is_bitwise(tmp_path):
  src = save_tiny_hf(str(tmp_path / "src"), "mha_tied_theta1e6", seed=5)
  ckpt = convert.import_weights(src, str(tmp_path / "ckpt"))
  out = str(tmp_path / "out")
  assert main(["export", ckpt, "--out", out, "--max-shard-size", "20KiB"]) == 0
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and not os.path.exists(os.path.join(out, "model.safetensors"))
  for name in shards:
    assert (
      os.path.getsize(os.path.join(out, name)) < 20 * 1024 + 4096
      or len(SafetensorsFile(os.path.join(out, name)).keys()) == 1
    )
  assert "lm_head.weight" not in index["weight_map"]  # tied
  vocab = TINY_HF_CONFIGS["mha_tied_theta1e6"]["vocab_size"]
  tokens = np.asarray(_tokens(vocab, (2, 17), seed=3))

  def hf_logits(path: str) -> np.ndarray:
    m = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
      return m(torch.tensor(tokens)).logits.numpy()

  np.testing.assert_array_equal(hf_logits(out), hf_logits(src))
  # Imported back, every parameter (untrained routing modules included) is the checkpoint's.
  a, b = _flat(_pure(ir_jax.load_model(out))), _flat(_pure(ir_jax.load_model(ckpt)))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------- reference
def reference_layout(d: int, r: int, h: int) -> dict[str, tuple[int, ...]]:
  """The README's reference table for one layer (written out independently of the code)."""
  table = {}
  for lw in ("lw_attn", "lw_mlp"):
    table |= {
      f"{lw}.linear1.weight": (r, d),
      f"{lw}.linear1.bias": (r,),
      f"{lw}.linear2.weight": (d, r),
      f"{lw}.linear2.bias": (d,),
    }
  for router in ("router_attention", "router_mlp"):
    table |= {
      f"{router}.hidden_layer.weight": (h, d),
      f"{router}.hidden_layer.bias": (h,),
      f"{router}.weight_predictor.weight": (2, h),
      f"{router}.weight_predictor.bias": (2,),
    }
  return table


def _torch_reference(st: SafetensorsFile, pre: str, n: np.ndarray):
  """The reference modules (nn.Linear stacks) on normed inputs n: (execute prob, argmax, LFF)."""

  def linear(name: str) -> torch.nn.Linear:
    w = torch.tensor(st.get(pre + name + ".weight"))
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
      lin.weight.copy_(w)
      lin.bias.copy_(torch.tensor(st.get(pre + name + ".bias")))
    return lin

  x = torch.tensor(n)
  with torch.no_grad():
    logits = linear("router_mlp.weight_predictor")(torch.relu(linear("router_mlp.hidden_layer")(x)))
    lff = linear("lw_mlp.linear2")(torch.nn.functional.silu(linear("lw_mlp.linear1")(x)))
  return torch.softmax(logits, -1)[..., 0].numpy(), logits.argmax(-1).numpy(), lff.numpy()


@pytest.mark.parametrize("router_hidden", [16, 0])
def test_reference_export_layout_and_reload(router_hidden, tmp_path):
  cfg = LlamaConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    lff_rank=8,
    router_hidden=router_hidden,
  )
  params = _random_params(cfg, 1)
  rng = np.random.RandomState(1)
  for k, v in _flat(params["routing"]).items():  # trained-looking, non-zero everywhere
    node = params["routing"]
    *path, last = k.split("/")
    for p in path:
      node = node[p]
    node[last] = rng.randn(*v.shape).astype(v.dtype) * (0.3 if "threshold" not in k else 1)
  params["routing"]["threshold"][0, 0] = -np.inf
  # A capacity table (fractions; the reference layout carries it in routing.json).
  params["routing"]["capacity"] = rng.uniform(0, 1, (2, 2)).astype(np.float32)
  params["routing"]["calibrated_for"] = rng.uniform(0, 1, (2, 2)).astype(np.float32)
  ckpt = checkpoint.save(str(tmp_path / "ckpt"), cfg, params)
  out = str(tmp_path / "ref")
  assert main(["export", ckpt, "--out", out, "--format", "reference"]) == 0

  st = SafetensorsFile(os.path.join(out, "routing.safetensors"))
  table = reference_layout(32, 8, router_hidden or 2)
  want = {f"model.layers.{i}.{k}": s for i in range(2) for k, s in table.items()}
  assert set(st.keys()) == set(want)
  for k, s in want.items():
    assert st.shape(k) == s, k
  ours = params["routing"]
  np.testing.assert_array_equal(
    st.get("model.layers.1.lw_attn.linear1.weight"), ours["attn_lff"]["w1"][1].T
  )
  np.testing.assert_array_equal(
    st.get("model.layers.0.lw_mlp.linear2.bias"), ours["mlp_lff"]["b2"][0]
  )

  # Thresholds ride in the second logit's bias; -inf (always execute) as -1e30.
  np.testing.assert_array_equal(
    st.get("model.layers.0.router_attention.weight_predictor.bias")[1], np.float32(-1e30)
  )
  # The reference's modules, run by torch, execute exactly where our score says so.
  model = ir_jax.load_model(ckpt)
  n = rng.randn(64, 32).astype(np.float32)
  for i in range(2):
    prob, argmax, lff = _torch_reference(st, f"model.layers.{i}.", n)
    routing_layer = jax.tree.map(lambda a: a[i], nnx.state(model.routing))
    layer = nnx.merge(nnx.graphdef(model.routing), routing_layer)
    score = np.asarray(layer.mlp_router(jnp.asarray(n)[None]))[0]
    t = float(params["routing"]["threshold"][i, 1])  # the MLP router's causal threshold
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-(score - t))), atol=1e-6)
    np.testing.assert_array_equal(argmax == 0, score > t)  # their gate = our causal mode
    assert 0 < (score > t).mean() < 1  # the threshold splits these inputs
    np.testing.assert_allclose(
      lff, np.asarray(layer.mlp_lff(jnp.asarray(n)[None]))[0], rtol=1e-5, atol=1e-5
    )

  # Loading the export back gives every forecaster, router and threshold bitwise.
  manifest = json.load(open(os.path.join(out, "routing.json")))
  assert manifest["layout"] == "reference" and manifest["thresholds"]["values"][0][0] == "-inf"
  back = _flat(_pure(ir_jax.load_model(out).routing))
  for k, v in _flat(ours).items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


# ------------------------------------------------------------- bad input
@pytest.fixture()
def small_ckpt(tmp_path):
  cfg = tiny_llama_config()
  return checkpoint.save(str(tmp_path / "ckpt"), cfg, _random_params(cfg, 2))


def test_checkpoint_still_being_written_is_refused(small_ckpt, capsys, tmp_path):
  out = str(tmp_path / "out")
  os.remove(os.path.join(small_ckpt, "params", "commit_success.txt"))
  err = _cli_error(capsys, "export", small_ckpt, "--out", out)
  assert "commit_success.txt" in err and "still being written" in err
  os.rename(
    os.path.join(small_ckpt, "params"), os.path.join(small_ckpt, "params.orbax-checkpoint-tmp-1234")
  )
  err = _cli_error(capsys, "export", small_ckpt, "--out", out)
  assert "params.orbax-checkpoint-tmp-1234" in err and "still being written" in err
  assert not os.path.exists(out)
  _no_partial(str(tmp_path))


def test_workdir_with_a_checkpoint_in_progress_is_refused(trained, capsys, tmp_path):
  work = str(tmp_path / "work")
  shutil.copytree(trained["workdir"], work)
  os.makedirs(os.path.join(work, "checkpoints", "lora", "6.orbax-checkpoint-tmp-99"))
  err = _cli_error(capsys, "export", work, "--out", str(tmp_path / "out"))
  assert "6.orbax-checkpoint-tmp-99" in err and "still being written" in err
  assert not os.path.exists(tmp_path / "out")


def test_existing_out_needs_overwrite(small_ckpt, capsys, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  err = _cli_error(capsys, "export", small_ckpt, "--out", str(out))
  assert "--overwrite" in err and str(out) in err
  assert (out / "keep.txt").read_text() == "mine"
  err = _cli_error(capsys, "export", small_ckpt, "--out", os.path.join(small_ckpt, "x"))
  assert "overlaps the checkpoint" in err
  (tmp_path / "empty").mkdir()
  err = _cli_error(capsys, "export", str(tmp_path / "empty"), "--out", str(tmp_path / "o2"))
  assert "neither an ir_jax checkpoint" in err
  assert main(["export", small_ckpt, "--out", str(out), "--overwrite"]) == 0
  assert not (out / "keep.txt").exists() and (out / "routing.json").exists()


def test_export_failing_midway_leaves_nothing_complete(small_ckpt, capsys, tmp_path, monkeypatch):
  calls = []

  def full_disk(path, specs, produce, metadata=None):
    calls.append(path)
    with open(path, "wb") as f:  # a partly written shard, as a full disk leaves it
      f.write(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ex, "write_streaming", full_disk)
  out = tmp_path / "out"
  err = _cli_error(capsys, "export", small_ckpt, "--out", str(out), "--max-shard-size", "8KB")
  assert "disk full while writing the model weights" in err and len(calls) == 1
  assert not out.exists()
  _no_partial(str(tmp_path))
  # Replacing an earlier export: a failure keeps the old one whole.
  monkeypatch.undo()
  assert main(["export", small_ckpt, "--out", str(out)]) == 0
  before = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in os.listdir(out)}

  def fail_on_routing(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(routing_io, "write_streaming", fail_on_routing)
  err = _cli_error(capsys, "export", small_ckpt, "--out", str(out), "--overwrite")
  assert "disk full while writing the routing modules" in err
  after = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in os.listdir(out)}
  assert after == before
  _no_partial(str(tmp_path))
