"""Shared test helpers: tiny random HuggingFace Llama directories saved with transformers,
a tiny ir_jax model config (`tiny_llama_config`), configs/tiny.py widened for memory
checks (`wide_tiny_config`), the training command line (`train_argv`, `train_cli`) and
the launch/ scripts loaded as modules (`load_launcher`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any

# Tests run on CPU; 8 fake devices let sharding tests build a mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from ir_jax.config import LlamaConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py")

# The smallest model with every part: GQA attention, forecasters, routers (2 layers, d=16).
TINY_LLAMA = dict(
  vocab_size=61,
  hidden_size=16,
  intermediate_size=24,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  lff_rank=4,
  router_hidden=8,
  max_position_embeddings=64,
)


def load_launcher(name: str) -> Any:
  """launch/NAME.py loaded as a module (launch/ holds scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "launch", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def tiny_llama_config(**fields: Any) -> LlamaConfig:
  """`TINY_LLAMA` as a LlamaConfig, with `fields` replacing or adding fields."""
  return LlamaConfig(**{**TINY_LLAMA, **fields})


def wide_tiny_config(rows: int) -> Any:
  """configs/tiny.py widened so that XLA's per-chip temporaries are large enough to compare
  (vocab 8192, d 256, 8 heads of 32 with 4 kv heads, MLP 512), on an all-FSDP mesh (data 1,
  fsdp -1, tensor 1), with `rows` 128-token rows per training batch."""
  spec = importlib.util.spec_from_file_location("tiny_cfg", TINY_CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
  cfg.model.update(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=512,
    num_heads=8,
    num_kv_heads=4,
    head_dim=32,
  )
  cfg.data.batch_size, cfg.data.seq_len = rows, 128
  return cfg


def train_argv(
  workdir: str,
  *overrides: str,
  config: str = TINY_CONFIG,
  flags: tuple[str, ...] = (),
  python: tuple[str, ...] = (sys.executable,),
) -> list[str]:
  """`python -m ir_jax.train --config CONFIG --workdir WORKDIR FLAGS --config.OVERRIDES`:
  each override is `field=value` (e.g. "train.router.steps=2"), given as
  `--config.field=value`; `flags` are other options, passed as they are."""
  cfg = [o if o.startswith("--") else f"--config.{o}" for o in overrides]
  return [*python, "-m", "ir_jax.train", "--config", config, "--workdir", workdir, *flags, *cfg]


def train_cli(
  workdir: str,
  *overrides: str,
  config: str = TINY_CONFIG,
  flags: tuple[str, ...] = (),
  cwd: str = REPO,
  env: dict[str, str] | None = None,
  timeout: float = 600,
) -> subprocess.CompletedProcess:
  """Run `train_argv(workdir, *overrides, ...)` to the end; output captured as text."""
  return subprocess.run(
    train_argv(workdir, *overrides, config=config, flags=flags),
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# name -> transformers.LlamaConfig kwargs. Together they cover GQA and
# multi-head, tied and untied embeddings, non-default rope_theta, llama3 and
# linear rope scaling, an explicit head_dim, and odd sizes.
TINY_HF_CONFIGS = {
  "gqa_llama3_untied": dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    rope_theta=50_000.0,
    rope_scaling=dict(
      rope_type="llama3",
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=16,
    ),
    tie_word_embeddings=False,
  ),
  "mha_tied_theta1e6": dict(
    vocab_size=131,
    hidden_size=40,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
  ),
  "headdim_linear_rope": dict(
    vocab_size=61,
    hidden_size=36,
    intermediate_size=50,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=14,
    rope_theta=20_000.0,
    rope_scaling=dict(rope_type="linear", factor=2.0),
    tie_word_embeddings=False,
  ),
}


def save_tiny_hf(path: str, name: str, seed: int = 0, **save_kwargs) -> str:
  import torch
  import transformers

  kw = dict(TINY_HF_CONFIGS[name], max_position_embeddings=256, rms_norm_eps=1e-5)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
  # Norm weights initialise to one; randomise them so a wrong mapping shows.
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path, **save_kwargs)
  return path


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, str]:
  root = tmp_path_factory.mktemp("tiny_hf")
  return {n: save_tiny_hf(str(root / n), n) for n in TINY_HF_CONFIGS}
