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
