"""Config and CLI fuzzing: random values for every public field give a ConfigError or a valid run.

What is checked against what:
  model      LlamaConfig.from_dict and HF config.json parsing (load_hf_config on a
             written file) with random values and wrong types: ConfigError or a
             config whose abstract init and forward (jax.eval_shape) trace, with
             finite rotary frequencies
  routing    RoutingSpec with random fields: ConfigError or a hashable spec whose
             k(T, layer, unit) lies in [0, T] for T in 1..64; valid specs run a
             routed forward of a tiny model with finite logits, or raise the
             ConfigError that `check_layers` predicts
  train      settings_from_config on configs/tiny.py with random overrides of the
             train, data, routing and mesh fields: ConfigError or valid Settings
  CLI        `python -m ir_jax.train` with one invalid --config override: exit 2,
             one stderr line `ir_jax.train: error: ...` naming the field, no traceback

Examples per property: MAX_EXAMPLES below (deterministic: hypothesis derandomized,
no example database). IR_JAX_FUZZ=N multiplies every count by N and draws new
random examples, for a longer hunt: `IR_JAX_FUZZ=20 python -m pytest tests/fuzz_test.py`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import string
import sys
import tempfile
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama_config, train_cli
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st

from ir_jax import routing as R
from ir_jax.config import ConfigError, LlamaConfig, load_hf_config
from ir_jax.model import abstract_model, init_model, rope_inv_freq
from ir_jax.train.config import Settings, settings_from_config

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = int(os.environ.get("IR_JAX_FUZZ", "0") or 0)
MAX_EXAMPLES = {
  "model": 150,
  "hf": 100,
  "routing_spec": 300,
  "routing_forward": 15,
  "train": 200,
  "cli": 6,
}


# Outcomes per test function: a fuzz test whose examples were all refused would pass
# while checking nothing, so test_zz_every_fuzz_test_saw_valid_examples asserts they vary.
OUTCOMES: Counter = Counter()


def event(kind: str) -> None:
  OUTCOMES[sys._getframe(1).f_code.co_name, kind] += 1  # the calling test's name
  hypothesis_event(kind)


def fuzz(name: str) -> Any:
  return settings(
    max_examples=MAX_EXAMPLES[name] * max(SCALE, 1),
    deadline=None,
    database=None,
    derandomize=not SCALE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  )


# Values of the wrong kind or out of any range: huge and negative integers,
# non-finite and tiny floats, strings, None, bools, lists and dicts.
JUNK = st.one_of(
  st.integers(min_value=-(10**13), max_value=10**13),
  st.sampled_from([0, -1, 2**31, 2**32, 2**63, 10**12, 10**400]),
  st.floats(allow_nan=True, allow_infinity=True),
  st.sampled_from([0.0, -0.0, 1e-300, 1e-45, 1e300, math.nan, math.inf, -math.inf]),
  st.text(max_size=6),
  st.none(),
  st.booleans(),
  st.lists(st.integers(-3, 3), max_size=3),
  st.dictionaries(st.text(string.ascii_letters, max_size=4), st.integers(-3, 3), max_size=2),
)


def maybe_junk(valid: st.SearchStrategy) -> st.SearchStrategy:
  return st.one_of(valid, valid, JUNK)


def overrides(fields: dict[str, st.SearchStrategy], junk: Any = None) -> st.SearchStrategy:
  """Some of `fields` set: half the time to plausible values only (so that valid
  configs are common), half the time with junk mixed in."""
  junk = junk or {}
  return st.one_of(
    st.fixed_dictionaries({}, optional=fields),
    st.fixed_dictionaries(
      {}, optional={k: st.one_of(v, v, junk.get(k, JUNK)) for k, v in fields.items()}
    ),
  )


# ------------------------------------------------------------------- model
ROPE = st.one_of(
  st.none(),
  st.fixed_dictionaries(
    {"rope_type": st.just("linear"), "factor": maybe_junk(st.floats(0.5, 8.0))}
  ),
  st.fixed_dictionaries(
    {
      "rope_type": st.sampled_from(["llama3", "default", "yarn"]),
      "factor": maybe_junk(st.floats(1.0, 8.0)),
      "low_freq_factor": maybe_junk(st.floats(0.5, 4.0)),
      "high_freq_factor": maybe_junk(st.floats(0.5, 8.0)),
      "original_max_position_embeddings": maybe_junk(st.integers(1, 4096)),
    }
  ),
)
TOKEN_ID = st.one_of(st.none(), st.integers(0, 300))
MODEL_FIELDS = {
  "vocab_size": st.integers(1, 300),
  "hidden_size": st.sampled_from([8, 16, 24, 32]),
  "intermediate_size": st.integers(1, 64),
  "num_layers": st.integers(1, 3),
  "num_heads": st.sampled_from([1, 2, 3, 4]),
  "num_kv_heads": st.sampled_from([1, 2, 4]),
  "head_dim": st.sampled_from([0, 2, 4, 6, 8, 5]),
  "rms_norm_eps": st.floats(1e-8, 0.5),
  "rope_theta": st.floats(1.5, 1e7),
  "rope_scaling": ROPE,
  "max_position_embeddings": st.integers(1, 4096),
  "tie_word_embeddings": st.booleans(),
  "bos_token_id": TOKEN_ID,
  "eos_token_id": TOKEN_ID,
  "pad_token_id": TOKEN_ID,
  "dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8"]),
  "param_dtype": st.sampled_from(["float32", "bfloat16"]),
  "scan_layers": st.booleans(),
  "remat": st.booleans(),
  "lff_rank": st.integers(1, 16),
  "router_hidden": st.integers(0, 16),
  "lora_rank": st.integers(0, 4),
  "lora_alpha": st.floats(0.1, 64.0),
}
BASE_MODEL = dict(
  vocab_size=101,
  hidden_size=32,
  intermediate_size=56,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  lff_rank=8,
  router_hidden=16,
  max_position_embeddings=128,
)


def check_traces(cfg: LlamaConfig) -> None:
  """Abstract init and forward of a valid config: no exception, finite rotary table."""
  assert np.isfinite(rope_inv_freq(cfg)).all(), cfg
  if cfg.num_layers > 4:  # tracing cost only; the shapes stay abstract either way
    jax.eval_shape(lambda: nnx.state(init_model(cfg)))
    return
  tokens = jax.ShapeDtypeStruct((2, 6), jnp.int32)
  out = jax.eval_shape(lambda t: init_model(cfg)(t), tokens)
  assert out.shape == (2, 6, cfg.vocab_size)


@fuzz("model")
@given(
  changes=overrides(MODEL_FIELDS),
  drop=st.sampled_from([None] * 8 + ["vocab_size", "num_heads"]),
  unknown=st.sampled_from([False] * 9 + [True]),
)
def test_model_config_fields(changes, drop, unknown):
  d = {**BASE_MODEL, **changes}
  if drop is not None:  # a required field missing
    del d[drop]
  if unknown:
    d["num_hidden_layer"] = 2  # an HF name, misspelt
  try:
    cfg = LlamaConfig.from_dict(d)
  except ConfigError:
    event("ConfigError")
    return
  event("valid")
  assert isinstance(cfg, LlamaConfig)
  assert LlamaConfig.from_dict(cfg.to_dict()) == cfg  # what validates round-trips
  check_traces(cfg)


JSONISH = st.recursive(
  st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**13), 10**13),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
  ),
  lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
  ),
  max_leaves=6,
)
HF_FIELDS = {
  "vocab_size": st.integers(1, 300),
  "hidden_size": st.sampled_from([8, 16, 32]),
  "intermediate_size": st.integers(1, 64),
  "num_hidden_layers": st.integers(1, 3),
  "num_attention_heads": st.sampled_from([1, 2, 4]),
  "num_key_value_heads": st.sampled_from([None, 1, 2]),
  "head_dim": st.sampled_from([None, 4, 8]),
  "rms_norm_eps": st.floats(1e-8, 0.1),
  "rope_theta": st.floats(2.0, 1e6),
  "rope_scaling": ROPE,
  "rope_parameters": st.one_of(
    st.none(),
    st.fixed_dictionaries({"rope_theta": st.floats(2.0, 1e6), "rope_type": st.just("default")}),
  ),
  "max_position_embeddings": st.integers(1, 4096),
  "tie_word_embeddings": st.booleans(),
  "bos_token_id": TOKEN_ID,
  "eos_token_id": st.one_of(TOKEN_ID, st.lists(TOKEN_ID, max_size=2)),
  "pad_token_id": TOKEN_ID,
  "model_type": st.sampled_from(["llama", "mistral", "gpt2"]),
  "architectures": st.sampled_from([["LlamaForCausalLM"], ["GPT2LMHeadModel"]]),
  "attention_bias": st.booleans(),
  "mlp_bias": st.booleans(),
}
BASE_HF = dict(
  vocab_size=101,
  hidden_size=32,
  intermediate_size=56,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  model_type="llama",
)


@fuzz("hf")
@given(
  changes=overrides(HF_FIELDS, {k: JSONISH for k in HF_FIELDS}),
  drop=st.sampled_from([None] * 8 + ["vocab_size", "num_hidden_layers"]),
  garbage=st.one_of(
    st.none(), st.binary(max_size=40), JSONISH.filter(lambda v: not isinstance(v, dict))
  ),
)
def test_hf_config_json(changes, drop, garbage):
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "config.json")
    if garbage is None:
      hf = {**BASE_HF, **changes}
      hf.pop(drop or "", None)
      with open(path, "w") as f:
        json.dump(hf, f)  # NaN and Infinity as Python's json writes them
    else:  # not JSON, or JSON that is not an object
      with open(path, "wb") as f:
        f.write(garbage if isinstance(garbage, bytes) else json.dumps(garbage).encode())
    try:
      cfg = load_hf_config(d)
    except ConfigError:
      event("ConfigError")
      return
  event("valid")
  assert isinstance(cfg, LlamaConfig)
  check_traces(cfg)


# ----------------------------------------------------------------- routing
CAPS = st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=1, max_size=3)
ROUTING_FIELDS = {
  "policy": st.sampled_from(R.POLICIES),
  "sparsity": st.floats(0.0, 1.0),
  "mode": st.sampled_from(R.MODES),
  "gate": st.sampled_from(R.GATES),
  "compute": st.sampled_from(R.COMPUTES),
  "temperature": st.one_of(st.floats(0.05, 10.0), st.sampled_from([1e-30, 1e30])),
  "capacities": st.one_of(st.none(), CAPS),
  "k_multiple": st.integers(1, 16),
  "seed": st.integers(0, 2**32 - 1),
}
JUNK_CAPS = st.one_of(JUNK, st.lists(st.one_of(JUNK, st.tuples(JUNK, JUNK)), max_size=3))


@fuzz("routing_spec")
@given(fields=overrides(ROUTING_FIELDS, {"capacities": JUNK_CAPS}))
def test_routing_spec_fields_and_k(fields):
  try:
    spec = R.RoutingSpec(**fields)
  except ConfigError:
    event("ConfigError")
    return
  event("valid")
  hash(spec)  # a static argument of jitted functions
  layers = len(spec.capacities) if spec.capacities is not None else 3
  for t in range(1, 65):
    for layer in range(layers):
      for unit in (0, 1):
        k = spec.k(t, layer, unit)
        assert isinstance(k, int) and 0 <= k <= t, (spec, t, layer, unit, k)


TINY = tiny_llama_config()


@pytest.fixture(scope="module")
def tiny_model():
  """Random weights filled in from numpy (an eager init compiles for ~20 s on a busy CPU):
  norms near one, routers with separated scores, forecasts that matter, thresholds 0."""
  graphdef, abstract = nnx.split(abstract_model(TINY))
  rng = np.random.RandomState(0)

  def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    name = jax.tree_util.keystr(path)
    if "threshold" in name:
      value = np.zeros(leaf.shape)
    elif "norm" in name:
      value = 1.0 + 0.1 * rng.randn(*leaf.shape)
    else:
      value = (1.0 if "_router" in name else 0.1) * rng.randn(*leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  state = jax.tree_util.tree_map_with_path(fill, abstract)
  return nnx.merge(graphdef, state)


@fuzz("routing_forward")
@given(fields=st.fixed_dictionaries({}, optional=ROUTING_FIELDS))
def test_valid_routing_specs_run_a_finite_forward(tiny_model, fields):
  try:
    spec = R.RoutingSpec(**fields)
  except ConfigError:
    return  # only valid specs run
  try:
    spec.check_layers(TINY.num_layers)
    fits = True
  except ConfigError:
    fits = False
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, TINY.vocab_size, (2, 8)), jnp.int32)
  event("ran" if fits else "ConfigError (capacities for another depth)")
  if not fits:  # a capacity table for another depth: refused before anything is traced
    with pytest.raises(ConfigError, match="routing.capacities has"):
      tiny_model(tokens, routing=spec)
    return
  logits, aux = tiny_model(tokens, routing=spec, return_aux=True)
  assert logits.shape == (2, 8, TINY.vocab_size)
  assert np.isfinite(np.asarray(logits)).all(), spec
  assert np.isfinite(np.asarray(aux["exec_rate"])).all(), spec


# ------------------------------------------------------------ train config
def tiny_dict() -> dict[str, Any]:
  spec = importlib.util.spec_from_file_location(
    "tiny_cfg", os.path.join(REPO, "configs", "tiny.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config().to_dict()


_INT = st.integers(-2, 20)
_NUM = st.floats(-1.0, 10.0)
_STAGE_FIELDS = {
  "steps": _INT,
  "learning_rate": st.floats(-1e-3, 1e-2),
  "batch_size": _INT,
  "seq_len": _INT,
  "warmup": st.floats(-0.5, 1.5),
  "grad_accum": _INT,
  "weight_decay": _NUM,
  "grad_clip": _NUM,
  "schedule": st.sampled_from(["constant", "cosine", "linear", "step"]),
}
TRAIN_FIELDS = {
  f"train.{stage}.{k}": v
  for stage in ("forecaster", "router", "lora")
  for k, v in _STAGE_FIELDS.items()
}
TRAIN_FIELDS.update(
  {
    "train.router.temperature_start": _NUM,
    "train.router.temperature_end": _NUM,
    "train.router.sparsity_weight": _NUM,
    "train.router.importance_weight": _NUM,
    "train.router.gate": st.sampled_from(["gumbel", "ste", "hard"]),
    "train.router.calibration_batches": _INT,
    "train.router.prior_bias": st.booleans(),
    "train.lora.rank": _INT,
    "train.lora.alpha": _NUM,
    "train.stages": st.sampled_from(
      [
        "forecaster",
        "forecaster,router",
        "router,lora",
        "lora",
        "forecaster,forecaster",
        "",
        "distill",
      ]
    ),
    "train.seed": _INT,
    "train.log_every": _INT,
    "train.checkpoint_every": _INT,
    "train.keep_checkpoints": _INT,
    "train.eval_batches": _INT,
    "train.eval_doc_tokens": _INT,
    "train.async_checkpoints": st.booleans(),
    "train.tensorboard": st.booleans(),
    "train.init_from": st.sampled_from(["", "runs/other"]),
    "mesh.data": st.integers(-2, 4),
    "mesh.fsdp": st.integers(-2, 4),
    "mesh.tensor": st.integers(-2, 4),
    "data.seq_len": _INT,
    "data.batch_size": _INT,
    "routing.policy": st.sampled_from(R.POLICIES + ("best",)),
    "routing.sparsity": st.floats(-0.5, 1.5),
    "routing.capacities": st.one_of(st.none(), CAPS),
    "routing.k_multiple": _INT,
    "routing.seed": _INT,
  }
)


def _set(d: dict[str, Any], path: str, value: Any) -> None:
  *parents, leaf = path.split(".")
  for p in parents:
    d = d[p]
  d[leaf] = value


@fuzz("train")
@given(changes=overrides(TRAIN_FIELDS), as_config_dict=st.booleans())
def test_train_settings_fields(changes, as_config_dict):
  import ml_collections

  d = tiny_dict()
  for path, value in changes.items():
    _set(d, path, value)
  try:
    s = settings_from_config(ml_collections.ConfigDict(d) if as_config_dict else d)
  except ConfigError:
    event("ConfigError")
    return
  event("valid")
  assert isinstance(s, Settings)
  for stage in s.train.stage_list:  # per-stage data overrides are valid too
    data = s.stage_data(stage)
    assert data.batch_size >= 1 and data.seq_len >= 2
    stage_cfg = s.train.stage(stage)
    # steps may be 0 only for a stage that fits in closed form before its first step
    assert (
      stage_cfg.steps >= (0 if getattr(stage_cfg, "init", "none") == "fit" else 1)
      and stage_cfg.grad_accum >= 1
    )


# --------------------------------------------------------------------- CLI
_WORD = st.text(alphabet=string.ascii_letters + "_-", max_size=6)
_F = lambda **kw: st.floats(**kw).map(repr)  # noqa: E731
BAD_CLI = st.one_of(
  st.tuples(
    st.just("train.forecaster.steps"),
    st.one_of(  # 0 is valid: the fit alone
      st.integers(-(10**12), -1).map(str), _WORD.map(lambda w: "x" + w)
    ),
  ),
  st.tuples(st.just("train.lora.steps"), st.integers(-(10**12), 0).map(str)),
  st.tuples(
    st.just("routing.sparsity"),
    st.one_of(
      _F(min_value=1.001, max_value=1e300),
      _F(min_value=-1e300, max_value=-1e-9),
      st.sampled_from(["nan", "inf", "-inf"]),
    ),
  ),
  st.tuples(st.just("mesh.fsdp"), st.integers(-(10**6), 0).filter(lambda v: v != -1).map(str)),
  st.tuples(st.just("data.seq_len"), st.integers(-(10**6), 1).map(str)),
  st.tuples(
    st.just("model.vocab_size"),
    st.one_of(st.integers(4_000_001, 10**15), st.integers(-(10**6), 0)).map(str),
  ),
  st.tuples(
    st.just("train.router.temperature_end"),
    st.one_of(_F(min_value=-1e300, max_value=0.0), st.sampled_from(["nan", "inf", "1e-45"])),
  ),
  st.tuples(
    st.just("routing.seed"),
    st.one_of(st.integers(-(10**9), -1), st.integers(2**32, 2**62)).map(str),
  ),
  st.tuples(st.just("routing.policy"), _WORD.filter(lambda w: w not in R.POLICIES)),
  st.tuples(st.just("train.stages"), _WORD.map(lambda w: "x" + w)),
  st.tuples(
    st.just("model.rms_norm_eps"),
    st.one_of(_F(min_value=1.0, max_value=1e300), _F(min_value=-1e300, max_value=0.0)),
  ),
  st.tuples(
    st.just("train.router.sparsity_weight"),
    st.one_of(_F(min_value=-1e300, max_value=-1e-9), st.sampled_from(["nan", "inf"])),
  ),
)


@pytest.fixture(scope="module")
def not_a_dir(tmp_path_factory):
  # As --workdir: a directory that does not exist yet. (ir_jax.train checks the workdir
  # before it loads the config, so a workdir that is a file would hide the config error
  # this test looks for; a config that somehow validated starts training, which the
  # test reports as a timeout or a wrong exit code.)
  return str(tmp_path_factory.mktemp("cli") / "fresh-run")


@fuzz("cli")
@given(case=BAD_CLI)
def test_cli_invalid_override_is_one_line(not_a_dir, case):
  field, value = case
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = train_cli(not_a_dir, f"{field}={value}", env=env, timeout=120)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("ir_jax.train: error: "), out.stderr[-2000:]
  assert field in lines[0] and "not a directory" not in lines[0], lines[0]


def test_zz_every_fuzz_test_saw_valid_examples():
  """Runs last: each fuzz test above produced accepted examples, not only refusals."""
  ran = {test for test, _ in OUTCOMES}
  if not ran:
    pytest.skip("run with the rest of this file")
  for test in ran:
    accepted = OUTCOMES[test, "valid"] + OUTCOMES[test, "ran"]
    assert accepted > 0, (test, dict(OUTCOMES))
