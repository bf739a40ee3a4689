"""`python -m ir_jax.generate` on a tiny checkpoint with calibrated thresholds.

What is checked against what:
  dense      the printed continuation vs a greedy loop over the model's full forward
             (argmax of the last position's logits, recomputed from scratch each step)
  routed     the same with a full causal-mode forward at the calibrated capacities, and
             the printed executed share vs the gates of one full causal forward
  workdir    the tokenizer a training workdir names, found without the original file
  bad input  one line naming the problem, exit 2, no traceback
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ir_jax import checkpoint
from ir_jax import generate as gen
from ir_jax.config import from_config_dict
from ir_jax.data.tokenize import byte_tokenizer
from ir_jax.errors import cli_main
from ir_jax.forecast import ForecasterParam
from ir_jax.model import init_model
from ir_jax.routing import RoutingSpec, calibrate_thresholds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ("The sky on a clear day is", "Water that gets cold will")
NEW = 12
PAD = 64  # the reference loop's row length


def _tiny_cfg():
  spec = importlib.util.spec_from_file_location(
    "tiny_cfg", os.path.join(REPO, "configs", "tiny.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  # No EOS inside the byte range: every continuation runs its full length.
  return from_config_dict(mod.get_config().model).replace(eos_token_id=256)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A random tiny model (byte vocabulary) with routers far from their init and causal
  thresholds calibrated at sparsity 0.4 on random tokens, saved with a tokenizer.json."""
  root = tmp_path_factory.mktemp("generate")
  model = init_model(_tiny_cfg(), seed=3)
  rng = np.random.RandomState(4)
  for _, var in nnx.to_flat_state(nnx.state(model.routing, nnx.Param)):
    std = 0.05 if isinstance(var, ForecasterParam) else 1.0
    var[...] = jnp.asarray(std * rng.randn(*var.shape), var[...].dtype)
  calib = rng.randint(0, 256, (4, 64))
  calibrate_thresholds(model, [calib], RoutingSpec(policy="informed", sparsity=0.4))
  (root / "tok").mkdir()
  byte_tokenizer().save(str(root / "tok" / "tokenizer.json"))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  return checkpoint.save(str(root / "tiny"), model.config, params, tokenizer_dir=str(root / "tok"))


@nnx.jit(static_argnames=("spec",))
def _logits(model, tokens_BxT, spec):
  return model(tokens_BxT, routing=spec, return_aux=True)


def _greedy(model, prompt: list[int], n: int, spec: RoutingSpec) -> list[int]:
  """Greedy continuation, the whole sequence through the full forward at every step.

  The row is padded on the right to a fixed length (one compile per spec): causal
  attention and causal routing let no later position change an earlier one's logits.
  """
  toks = list(prompt)
  for _ in range(n):
    row = np.zeros((1, PAD), np.int32)
    row[0, : len(toks)] = toks
    logits, _ = _logits(model, jnp.asarray(row), spec)
    toks.append(int(np.argmax(np.asarray(logits[0, len(toks) - 1]))))
  return toks[len(prompt) :]


def _blocks(out: str) -> dict[tuple[int, str], str]:
  """(prompt number, "dense" | "routed") -> the continuation as printed."""
  found = {}
  parts = re.split(r"^(?:\[(\d+)/\d+\] .*|--- (dense|routed):)\n", out, flags=re.M)
  prompt = None
  # re.split with two groups: text, group1, group2, text, ...
  for i in range(1, len(parts), 3):
    if parts[i] is not None:
      prompt = int(parts[i])
    else:
      text = parts[i + 2]
      text = text.split("\n--- routed executed")[0].split("\n\n[")[0]
      found[prompt, parts[i + 1]] = text[:-1] if text.endswith("\n") else text
  return found


def test_dense_and_routed_continuations_match_full_forward_loops(ckpt, capsys):
  argv = [ckpt, "--max-new-tokens", str(NEW)]
  for p in PROMPTS:
    argv += ["--prompt", p]
  assert gen.main(argv) == 0
  out = capsys.readouterr().out
  from ir_jax.api import load_model

  model = load_model(ckpt)
  caps = np.asarray(model.routing.calibrated_for[...])
  np.testing.assert_allclose(caps, 0.6)
  routed = RoutingSpec(policy="informed", mode="causal", capacities=tuple(map(tuple, caps)))
  blocks = _blocks(out)
  tok = byte_tokenizer()
  shares = [float(s) for s in re.findall(r"routed executed ([\d.]+)% of", out)]
  assert len(shares) == len(PROMPTS), out
  for i, text in enumerate(PROMPTS, 1):
    prompt = list(text.encode("utf-8"))
    for name, spec in (("dense", RoutingSpec(policy="dense")), ("routed", routed)):
      want = tok.decode(_greedy(model, prompt, NEW, spec), skip_special_tokens=False)
      assert blocks[i, name] == want, (name, out)
    # The tokens the routed model read: the prompt and all new tokens but the last.
    fed = prompt + _greedy(model, prompt, NEW, routed)[:-1]
    row = np.zeros((1, PAD), np.int32)
    row[0, : len(fed)] = fed
    _, aux = _logits(model, jnp.asarray(row), routed)
    gates = np.asarray(aux["gate_BxT"])[..., : len(fed)]  # [L, 2, B, T]
    assert shares[i - 1] == pytest.approx(100 * float(np.mean(gates)), abs=0.05)
    assert 20 < shares[i - 1] < 95  # routed, not dense
  assert f"over the {len(PROMPTS[0]) + NEW - 1} tokens it read" in out


def test_decode_stops_at_eos_and_streams_every_token(ckpt):
  from ir_jax.api import load_model

  model = load_model(ckpt)
  prompt = list(PROMPTS[0].encode("utf-8"))
  dense = RoutingSpec(policy="dense")
  want = _greedy(model, prompt, NEW, dense)
  seen: list[list[int]] = []
  new, share, fed = gen.decode(model, prompt, NEW, dense, on_token=lambda t: seen.append(list(t)))
  assert new == want and share == 1.0 and fed == len(prompt) + NEW - 1
  assert seen == [want[: k + 1] for k in range(NEW)]
  # The fourth new token as EOS: three tokens come back, the EOS is not among them.
  new, _, fed = gen.decode(model, prompt, NEW, dense, eos=want[3])
  assert new == want[:3] and fed == len(prompt) + 3


def test_printer_holds_back_an_incomplete_character(capsys):
  tok = byte_tokenizer()
  show = gen.Printer(lambda ids: tok.decode(ids, skip_special_tokens=False))
  ids = list("é!".encode("utf-8"))  # two bytes for é
  for k in range(1, len(ids) + 1):
    show(ids[:k])
  show.finish(ids)
  assert capsys.readouterr().out == "é!\n"


def test_workdir_tokenizer_is_the_one_its_run_named(tmp_path):
  # A workdir's run.json, as ir_jax.train writes it, with base weights imported into
  # WORKDIR/base from a GGUF that is gone now.
  work, base = tmp_path / "work", tmp_path / "work" / "base"
  base.mkdir(parents=True)
  (base / "tokenizer.json").write_text("{}")

  def write(data_tokenizer: str, source: str) -> str:
    run = {
      "format": "ir_jax.run",
      "version": 1,
      "base": {"kind": "checkpoint", "path": str(base)},
      "config": {"model": {"checkpoint": source}, "data": {"tokenizer": data_tokenizer}},
    }
    (work / "run.json").write_text(json.dumps(run))
    return gen.model_tokenizer(str(work))

  assert write("assets/m.gguf", "assets/m.gguf") == str(base)  # the imported copy
  assert write("", "assets/m.gguf") == str(base)
  assert write("byte", "assets/m.gguf") == "byte"  # trained with another tokenizer
  (base / "tokenizer.json").unlink()
  assert write("", "assets/m.gguf") == "assets/m.gguf"
  assert gen.model_tokenizer(str(tmp_path / "x.gguf")) == str(tmp_path / "x.gguf")


def _cli_error(capsys, *argv: str) -> str:
  with pytest.raises(SystemExit) as e:
    cli_main(lambda: gen.main(list(argv)), gen.PROG)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2, err
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith("ir_jax.generate: error: "), err
  return err


def test_bad_input_is_one_line(ckpt, tmp_path, capsys):
  missing = str(tmp_path / "nope")
  assert "nope: no such file" in _cli_error(capsys, missing, "--prompt", "a")
  assert "no prompt" in _cli_error(capsys, ckpt)
  assert "--prompt is empty" in _cli_error(capsys, ckpt, "--prompt", "  ")
  assert "--max-new-tokens must be >= 1" in _cli_error(
    capsys, ckpt, "--prompt", "a", "--max-new-tokens", "0"
  )
  assert "exceeds the model's 512 positions" in _cli_error(
    capsys, ckpt, "--prompt", "a", "--max-new-tokens", "600"
  )
  assert "--prompt-file" in _cli_error(capsys, ckpt, "--prompt-file", missing)
  (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
  assert "not UTF-8" in _cli_error(capsys, ckpt, "--prompt-file", str(tmp_path / "latin1.txt"))
  assert "--temperature" in _cli_error(capsys, ckpt, "--prompt", "a", "--temperature", "-1")
  bad_tok = tmp_path / "tokenizer.json"
  bad_tok.write_text("not json")
  assert "tokenizer" in _cli_error(capsys, ckpt, "--prompt", "a", "--tokenizer", str(bad_tok))


def test_help_says_what_it_does(capsys):
  with pytest.raises(SystemExit) as e:
    gen.main(["--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  for phrase in ("workdir", ".gguf", "causal", "calibrated", "--max-new-tokens", "greedily"):
    assert phrase in text, phrase
