"""Argv fuzzing of every argparse entry point, in process: random flags from each
program's own --help with hostile values (missing, empty, binary and directory paths,
junk configs, URLs, odd numbers). Every outcome must be exit 0 (--help) or exit 2 with
`PROG: error: ...` as the last stderr line and no traceback; exit 1 (a crash) fails.
No value ever names a usable model, config or dataset, so nothing heavy runs.
`python -m ir_jax.train` / `ir_jax.aot` (absl) are fuzzed by fuzz_test.py in subprocesses."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import string
import sys
from collections import Counter
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# runpy warns that ir_jax.eval.shift is already imported (by ir_jax.eval): harmless here.
pytestmark = [
  pytest.mark.slow,
  pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning"),
]

ENTRY_POINTS = {  # module -> (program name in its errors, subcommands)
  "ir_jax.eval": ("ir_jax.eval", ()),
  "ir_jax.eval.shift": ("ir_jax.eval.shift", ()),
  "ir_jax.data": ("python -m ir_jax.data", ("prepare", "inspect")),
  "ir_jax.convert": ("ir_jax.convert", ("import", "export")),
  "ir_jax.bench": ("ir_jax.bench", ()),
  "ir_jax.perplexity": ("ir_jax.perplexity", ()),
}
OUTCOMES: Counter = Counter()


def invoke(module: str, argv: list[str]) -> tuple[int, str]:
  out, err = io.StringIO(), io.StringIO()
  with (
    mock.patch.object(sys, "argv", [module, *argv]),
    contextlib.redirect_stdout(out),
    contextlib.redirect_stderr(err),
  ):
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=False)
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return code, err.getvalue()


def flags_of(module: str, sub: str | None) -> list[str]:
  code, _ = invoke(module, [*([sub] if sub else []), "--help"])
  assert code == 0
  out = io.StringIO()
  with (
    mock.patch.object(sys, "argv", [module, *([sub] if sub else []), "--help"]),
    contextlib.redirect_stdout(out),
    contextlib.redirect_stderr(io.StringIO()),
  ):
    with contextlib.suppress(SystemExit):
      runpy.run_module(module, run_name="__main__", alter_sys=False)
  return sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.getvalue())) - {"--help"})


@pytest.fixture(scope="module")
def junk(tmp_path_factory) -> dict[str, str]:
  d = tmp_path_factory.mktemp("junk")
  (d / "empty.txt").write_text("")
  (d / "binary.bin").write_bytes(bytes(range(256)) * 8)
  (d / "noconfig.py").write_text("x = 1\n")
  (d / "raises.py").write_text("raise RuntimeError('boom')\n")
  (d / "nodata.py").write_text(
    "import ml_collections\n\ndef get_config():\n"
    "  return ml_collections.ConfigDict({'model': {}})\n"
  )
  (d / "emptydir").mkdir()
  (d / "badmodel").mkdir()
  (d / "badmodel" / "config.json").write_text("{not json")
  (d / "list.json").write_text("[1, 2]")
  return {
    k: str(d / k)
    for k in (
      "empty.txt",
      "binary.bin",
      "noconfig.py",
      "raises.py",
      "nodata.py",
      "emptydir",
      "badmodel",
      "list.json",
    )
  } | {"missing": str(d / "missing" / "x.txt"), "root": str(d)}


_WORD = st.text(alphabet=string.ascii_letters + string.digits + "_-.,:=/", max_size=8)
NUMBERS = st.sampled_from(
  [
    "0",
    "-1",
    "1",
    "2",
    "0.5",
    "1.5",
    "-0.0",
    "nan",
    "inf",
    "1e309",
    "99999999999",
    "0x10",
    "1,2",
    "0.25,0.4",
    ",",
    "",
  ]
)


def values(junk: dict[str, str]) -> st.SearchStrategy[str]:
  paths = st.sampled_from([v for k, v in junk.items() if k != "root"] + ["gs://bucket/x"])
  return st.one_of(paths, NUMBERS, _WORD)


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_random_argv_gives_help_or_one_line_error(module, junk):
  prog, subs = ENTRY_POINTS[module]
  flags = {s: flags_of(module, s) for s in (subs or (None,))}
  # Every config-reading flag gets a junk config, so no real work can start.
  cfg_values = st.sampled_from(
    [junk[k] for k in ("empty.txt", "noconfig.py", "raises.py", "nodata.py", "missing", "emptydir")]
  )

  @st.composite
  def argvs(draw) -> list[str]:
    sub = draw(st.sampled_from(subs)) if subs else None
    argv = [sub] if sub else []
    if "--config" in flags[sub] and (module == "ir_jax.bench" or draw(st.booleans())):
      argv += ["--config", draw(cfg_values)]
    for _ in range(draw(st.integers(0, 5))):
      flag = draw(st.sampled_from(flags[sub]))
      if flag == "--config":
        argv += [flag, draw(cfg_values)]
      elif draw(st.integers(0, 9)) == 0:
        argv.append(flag)  # as a switch, or missing its value
      else:
        argv += [flag, draw(values(junk))]
    if draw(st.integers(0, 9)) == 0:
      argv.append(draw(values(junk)))  # a stray positional
    return argv

  @settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
  )
  @given(argv=argvs())
  def check(argv: list[str]) -> None:
    if module == "ir_jax.bench" and "--config" not in argv:
      return  # bench without a config file runs a real benchmark
    code, err = invoke(module, argv)
    assert code in (0, 2), (argv, code, err[-3000:])
    assert "Traceback" not in err, (argv, err[-3000:])
    if code == 2:
      last = err.strip().splitlines()[-1]
      assert re.match(
        rf"^(python -m )?{re.escape(prog.replace('python -m ', ''))}"
        r"[\w .-]*: error: \S",
        last,
      ) or last.startswith(f"{prog}: error: "), (argv, err[-3000:])
    OUTCOMES[module, code] += 1

  with contextlib.chdir(junk["root"]):  # anything written by mistake lands in a temp dir
    check()
  assert OUTCOMES[module, 2] > 0
