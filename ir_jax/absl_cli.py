"""Flag parsing for the two absl entry points (`ir_jax.train`, `ir_jax.aot`).

absl's own `--help` exits 1 and lists no config field; a bad `--config.X=V`
override surfaces as an escaped multi-line KeyError. `parse_flags` gives
`--help` (exit 0: the module's usage, its flags, and with `--config FILE` every
config field with its value) and one-line errors (exit 2) instead.
"""

from __future__ import annotations

import os
import re
import sys

from absl import flags

from ir_jax.config_file import config_lines, load_config

HELP_FLAGS = ("--help", "-h", "--helpfull", "--helpshort", "-?")


def config_path(argv: list[str]) -> str | None:
  """The value of `--config` in argv (`--config=F` or `--config F`), if any."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def print_help(argv: list[str], prog: str, doc: str) -> None:
  """Usage, this program's flags, and the fields of `--config FILE` when given."""
  print(doc.strip())
  print(f"\nflags of {prog}:")
  main = sys.modules["__main__"]
  module = getattr(main, "__spec__", None)
  names = {module.name if module else "", getattr(main, "__file__", "") or ""}
  for name in names:
    text = flags.FLAGS.module_help(name) if name else ""
    if text.strip():
      # Required flags (--config, --workdir, ...) have no default worth showing.
      print(text.replace("(default: 'None')", "(required)") if "config" in text else text)
      break
  path = config_path(argv)
  if path is None:
    configs = "configs/" if os.path.isdir("configs") else "the configs/ folder of the repository"
    print(
      f"\nconfig fields: add --config FILE to --help to list every field of FILE with its "
      f"value (the files are in {configs}); override one with --config.SECTION.FIELD=V."
    )
    return
  try:
    file, _, arg = path.partition(":")  # ml_collections' FILE:ARGUMENT form
    lines = config_lines(load_config(file, arg or None))
  except Exception as e:  # a missing or broken config file: say so, still exit 0
    print(f"\ncannot list the fields of --config {path}: {str(e).strip().splitlines()[-1]}")
    return
  print(f"\nconfig fields of {path} (override with --config.SECTION.FIELD=V):")
  print("\n".join(lines))


def _unknown_field(e: BaseException) -> str:
  text = str(e).strip().strip("'\"").replace("\\'", "'").replace("\\n", "\n")
  first, *rest = [line.strip().strip("'\"") for line in text.splitlines() if line.strip()]
  hint = f" ({rest[0]})" if rest else ""
  return f"a --config override names an unknown field {first!r}{hint}"


def parse_flags(argv: list[str], prog: str, doc: str) -> list[str]:
  """absl flag parsing with --help (exit 0) and one-line errors (exit 2)."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    print_help(argv, prog, doc)
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = str(e).splitlines()[0]
  except (KeyError, AttributeError) as e:
    msg = _unknown_field(e)
  except (TypeError, ValueError) as e:
    msg = f"bad --config override: {str(e).splitlines()[0]}"
  msg = re.sub(r"\s+", " ", msg)
  print(
    f"{prog}: error: {msg} (see --help for the flags; --help --config FILE lists the fields)",
    file=sys.stderr,
  )
  sys.exit(2)
