"""The package's import graph is acyclic, counting function-local imports too.

A cycle hidden behind a function-local import still couples two modules both
ways; this reads every `import` statement of ir_jax/ with `ast` and looks for
strongly connected components (Tarjan) in the module graph.
"""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(os.path.join(REPO, "ir_jax")):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), REPO)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
  return out


def _imports(path: str, known: dict[str, str]) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.add(sub if sub in known else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
  return {m for m in found if m in known}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v: str) -> None:
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def test_cycle_finder_finds_a_known_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_package_import_graph_is_acyclic():
  mods = _modules()
  assert "ir_jax.routing" in mods and "ir_jax.model" in mods
  graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
  # The finder sees real edges: routing builds on the model, and the routing
  # package's modules build on one another (the spec at the bottom).
  assert "ir_jax.model" in graph["ir_jax.routing.forward"]
  assert "ir_jax.routing.spec" in graph["ir_jax.routing.forward"]
  assert "ir_jax.routing.forward" in graph["ir_jax.routing"]
  assert _cycles(graph) == []


# ------------------------------------------------------------ package level
# A package-level arrow that closes a cycle, allowed until the named work
# removes it. Each entry must still exist (a removed one is dropped from here),
# and with these arrows taken out the package graph must be acyclic.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def _package(module: str) -> str:
  """ir_jax.train.loop -> ir_jax.train; ir_jax.fit -> ir_jax.fit."""
  return ".".join(module.split(".")[:2])


def _package_graph() -> dict[str, set[str]]:
  mods = _modules()
  graph: dict[str, set[str]] = {}
  for m, p in mods.items():
    graph.setdefault(_package(m), set()).update(_package(d) for d in _imports(p, mods))
  for pkg, deps in graph.items():
    deps.discard(pkg)
  return graph


def test_package_collapse():
  assert _package("ir_jax.train.loop") == "ir_jax.train"
  assert _package("ir_jax.train") == "ir_jax.train"
  assert _package("ir_jax.fit") == "ir_jax.fit"
  assert _package("ir_jax") == "ir_jax"


def test_package_graph_is_acyclic_but_for_the_allowed_arrows():
  graph = _package_graph()
  # Function-local imports count: train/rundir's import of convert is one the
  # graph must see (it closed the train <-> convert cycle before export stopped
  # reading run directories through train).
  assert "ir_jax.convert" in graph["ir_jax.train"]
  assert "ir_jax.rundir" in graph["ir_jax.convert"] and "ir_jax.rundir" in graph["ir_jax.train"]
  stale = sorted(e for e in ALLOWED_UPWARD if e[1] not in graph.get(e[0], set()))
  assert not stale, f"{stale} no longer exist; drop them from ALLOWED_UPWARD"
  pruned = {a: {b for b in deps if (a, b) not in ALLOWED_UPWARD} for a, deps in graph.items()}
  assert _cycles(pruned) == [], "package-level import cycles (function-local imports included)"


def test_bottom_floor_modules_import_no_ir_jax_module():
  mods = _modules()
  for m in ("ir_jax.base_error", "ir_jax.bootstrap", "ir_jax.gguf_io"):
    assert _imports(mods[m], mods) == set(), m
  assert _imports(mods["ir_jax.errors"], mods) == {"ir_jax.base_error"}
  assert _imports(mods["ir_jax.rundir"], mods) == {"ir_jax.config"}


# ------------------------------------------------------------ function-local imports
# Imports of ir_jax modules inside function bodies. Each one hides an arrow from
# a reader of the module's head; the ceiling only goes down (78 before issue 28). The ones
# left are deliberate: a CLI's --help answers before JAX, tensorflow_datasets or the weight
# loaders load (train, data, eval, generate, aot), lm_eval's registration after its check.
LOCAL_IMPORT_CEILING = 15


def _local_imports(path: str) -> list[int]:
  """Line numbers of imports of ir_jax modules inside functions of the file at `path`."""
  lines = set()
  for fn in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(fn):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
          if node.module.split(".")[0] == "ir_jax":
            lines.add(node.lineno)
        elif isinstance(node, ast.Import):
          if any(a.name.split(".")[0] == "ir_jax" for a in node.names):
            lines.add(node.lineno)
  return sorted(lines)


def test_local_import_counter(tmp_path):
  src = tmp_path / "m.py"
  src.write_text(
    "import ir_jax.model\n"
    "def f():\n"
    "  import numpy\n"
    "  from ir_jax import config\n"
    "  def g():\n"
    "    import ir_jax.fit as F\n"
    "  return config\n"
  )
  assert _local_imports(str(src)) == [4, 6]


def test_function_local_imports_stay_under_the_ceiling():
  found = {m: _local_imports(p) for m, p in _modules().items()}
  total = sum(len(v) for v in found.values())
  listing = ", ".join(f"{m}:{len(v)}" for m, v in sorted(found.items()) if v)
  assert total <= LOCAL_IMPORT_CEILING, f"{total} function-local ir_jax imports ({listing})"
