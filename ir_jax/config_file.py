"""Loading a config file (configs/*.py): the one place that runs one.

A config file is Python by design (ml_collections' `get_config()`), named by
the user as code to run, as `--config` of every entry point; nothing else in
the package executes a file.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any

from ir_jax.config import ConfigError


def load_config(path: str, arg: str | None = None) -> Any:
  """`get_config()` (or `get_config(arg)`) of a config file; one-line errors."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {path}: no such file")
  spec = importlib.util.spec_from_file_location("_ir_jax_config", path)
  if spec is None or spec.loader is None:  # not a .py file
    raise ConfigError(
      f"--config {path}: not a Python config file (expected a .py file "
      "defining get_config(), like configs/tiny.py)"
    )
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except Exception as e:  # a config that does not import is the user's to fix
    raise ConfigError(f"--config {path}: cannot load it ({type(e).__name__}: {e})") from None
  if not hasattr(mod, "get_config"):
    raise ConfigError(f"--config {path}: defines no get_config()")
  return mod.get_config(arg) if arg else mod.get_config()


OVERRIDE = "--config."  # the one override spelling of every entry point: --config.data.seq_len=128


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """argv without its `--config.SECTION.FIELD=V` (or `... V`) overrides, and those as `KEY=V`."""
  rest: list[str] = []
  overrides: list[str] = []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith(OVERRIDE):
      key, sep, value = a[len(OVERRIDE) :].partition("=")
      if not sep:
        if i + 1 >= len(argv):
          raise ConfigError(f"{a} needs a value ({a}=VALUE)")
        value, i = argv[i + 1], i + 1
      overrides.append(f"{key}={value}")
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def _parse_value(raw: str, old: Any) -> Any:
  """A Python literal, else the text itself; text stays text where the field holds text."""
  if isinstance(old, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw  # bare words: --config.data.tokenizer=byte
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
  """Set `KEY=VALUE` items (KEY dotted: data.seq_len) on a ConfigDict; one-line errors."""
  for item in overrides:
    key, _, raw = item.partition("=")
    *parents, leaf = key.split(".")
    node = cfg
    for depth, name in enumerate([*parents, leaf]):
      if not hasattr(node, "keys") or name not in node:
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(name, known, n=1)
        where = ".".join([*parents, leaf][:depth]) or "the config"
        hint = f" (did you mean {close[0]!r}?)" if close else f"; {where} has {known}"
        raise ConfigError(f"{OVERRIDE}{key}: unknown config field {name!r}{hint}")
      if depth < len(parents):
        node = node[name]
    try:
      node[leaf] = _parse_value(raw, node[leaf])
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{OVERRIDE}{item}: {str(e).splitlines()[0]}") from None
  return cfg


def config_lines(cfg: Any, prefix: str = "config") -> list[str]:
  """`--config.SECTION.FIELD=value` lines for every leaf of a ConfigDict."""
  out = []
  for key in sorted(cfg.keys()):
    value = cfg[key]
    if hasattr(value, "keys") and not isinstance(value, dict):
      out += config_lines(value, f"{prefix}.{key}")
    else:
      out.append(f"  --{prefix}.{key}={value!r}")
  return out
