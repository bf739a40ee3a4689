"""Where a compiled forward spends its time, split by what the model is doing.

`python -m ir_jax.bench --workdir RUN --profile 2048` runs the trained model's
dense and routed prefill (the programs `ir_jax.bench_trained` times) under
`jax.profiler`, reads the per-instruction events of the trace, and charges
each XLA instruction to a component by the Python source it was traced from:

- the compiled module's metadata gives every instruction a stack frame
  (file, function, line, parent frame); a fusion is charged by the dot
  inside it when it has one (a fused matmul is the matmul's time), else by
  its own metadata;
- the frames are walked from the innermost outwards and the first frame in an
  ir_jax file decides, by the qualified name of the function around that line
  (`Attention.keys_values` -> K/V projections, `Forecaster.__call__` ->
  forecasters, `routing.unit.gather` -> routing glue, ...; `COMPONENTS`);
- control-flow instructions (while, conditional, call) are not charged: their
  events span the instructions inside them, which are.

What comes out is measured time per component (sum of the instruction events,
over the timed calls, divided by the calls) next to the wall time per call. On a
CPU the events of independent instructions can overlap, so the components can
sum to a little more than the wall; what is not charged to a component (copies,
layout changes, loop bookkeeping, the launch) is `other`.
"""

from __future__ import annotations

import ast
import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any, Callable, Iterable

import jax

# (file suffix, qualified-name prefix) -> component; first match wins, most specific first.
COMPONENTS: tuple[tuple[str, str, str], ...] = (
  ("ir_jax/attention.py", "", "attention scores+values"),
  ("ir_jax/forecast.py", "Forecaster", "forecasters"),
  ("ir_jax/forecast.py", "Router", "routers"),
  ("ir_jax/forecast.py", "", "routers"),
  ("ir_jax/model.py", "Attention.keys_values", "K/V projections"),
  ("ir_jax/model.py", "apply_rope", "attention q/o projections"),
  ("ir_jax/model.py", "Attention", "attention q/o projections"),
  ("ir_jax/model.py", "MLP", "MLP"),
  ("ir_jax/model.py", "LoRA", "LoRA"),
  ("ir_jax/model.py", "RMSNorm", "norms"),
  ("ir_jax/model.py", "Llama.logits", "LM head"),
  ("ir_jax/model.py", "Llama.embed", "embedding"),
  ("ir_jax/model.py", "", "residual, layer loop"),
  ("ir_jax/routing/", "", "routing glue (top-k, gather, scatter)"),
)
ORDER = (
  "attention q/o projections",
  "attention scores+values",
  "K/V projections",
  "MLP",
  "forecasters",
  "routers",
  "routing glue (top-k, gather, scatter)",
  "norms",
  "residual, layer loop",
  "LM head",
  "embedding",
  "LoRA",
  "other",
)
_CONTROL = {"while", "conditional", "call", "parameter", "tuple", "get-tuple-element", "constant"}
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s=\s.*?([a-z][\w\-]*)\(")
_META_FRAME = re.compile(r"stack_frame_id=(\d+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")


@functools.lru_cache(maxsize=None)
def _qualnames(path: str) -> list[tuple[int, int, str]]:
  """(first line, last line, qualified name) of every function in a source file."""
  try:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
  except (OSError, SyntaxError):
    return []
  out: list[tuple[int, int, str]] = []

  def walk(node: ast.AST, prefix: str) -> None:
    for ch in ast.iter_child_nodes(node):
      if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        name = f"{prefix}{ch.name}"
        if not isinstance(ch, ast.ClassDef):
          out.append((ch.lineno, ch.end_lineno or ch.lineno, name))
        walk(ch, name + ".")
      else:
        walk(ch, prefix)

  walk(tree, "")
  return out


def qualname_at(path: str, line: int) -> str:
  """The innermost function around `line` of `path` ('' outside any)."""
  best = ""
  width = None
  for a, b, name in _qualnames(path):
    if a <= line <= b and (width is None or b - a < width):
      best, width = name, b - a
  return best


def classify_frames(frames: Iterable[tuple[str, str, int]]) -> str:
  """The component of the innermost ir_jax frame that a rule names (else 'other').

  `frames`: (file, function, line), innermost first."""
  for path, _fn, line in frames:
    norm = path.replace(os.sep, "/")
    if "/ir_jax/" not in norm or "bench" in os.path.basename(norm):
      continue
    qual = qualname_at(path, line)
    for suffix, prefix, comp in COMPONENTS:
      if (norm.endswith(suffix) or (suffix.endswith("/") and suffix in norm)) and qual.startswith(
        prefix
      ):
        return comp
  return "other"


def _table(section: str, lines: list[str]) -> dict[int, str]:
  out: dict[int, str] = {}
  try:
    start = lines.index(section) + 1
  except ValueError:
    return out
  for ln in lines[start:]:
    if not ln.strip():
      break
    k, _, v = ln.strip().partition(" ")
    out[int(k)] = v
  return out


def _fields(text: str) -> dict[str, int]:
  return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}


def instruction_components(hlo_text: str) -> dict[str, str]:
  """Instruction name -> component, for every instruction of a compiled module's text."""
  lines = hlo_text.splitlines()
  files = {k: v.strip('"') for k, v in _table("FileNames", lines).items()}
  funcs = {k: v.strip('"') for k, v in _table("FunctionNames", lines).items()}
  locs = {k: _fields(v) for k, v in _table("FileLocations", lines).items()}
  frames = {k: _fields(v) for k, v in _table("StackFrames", lines).items()}

  @functools.lru_cache(maxsize=None)
  def frame_component(fid: int) -> str:
    chain: list[tuple[str, str, int]] = []
    seen = set()
    while fid in frames and fid not in seen:
      seen.add(fid)
      fr = frames[fid]
      loc = locs.get(fr.get("file_location_id", -1), {})
      chain.append(
        (
          files.get(loc.get("file_name_id", -1), ""),
          funcs.get(loc.get("function_name_id", -1), ""),
          loc.get("line", 0),
        )
      )
      parent = fr.get("parent_frame_id", 0)
      if parent == fid:
        break
      fid = parent
    return classify_frames(chain)

  # Per computation: its instructions (name, opcode, frame id).
  comps: dict[str, list[tuple[str, str, int | None, str | None]]] = {}
  operands: dict[str, list[str]] = {}
  current = None
  for ln in lines:
    if ln and not ln.startswith(" ") and "{" in ln and "(" in ln and not ln.startswith("HloModule"):
      current = (
        ln.split()[0].lstrip("%") if not ln.startswith("ENTRY") else ln.split()[1].lstrip("%")
      )
      comps[current] = []
      continue
    m = _INSTR.match(ln)
    if m and current is not None:
      fm = _META_FRAME.search(ln)
      cm = _CALLS.search(ln)
      comps[current].append(
        (m.group(1), m.group(2), int(fm.group(1)) if fm else None, cm.group(1) if cm else None)
      )
      rest = ln[m.end() :]
      args = rest[: rest.find(")")] if ")" in rest else rest
      operands[m.group(1)] = _OPERAND.findall(args)

  def fusion_frame(called: str | None, own: int | None) -> int | None:
    for _name, op, fid, _c in comps.get(called or "", []):
      if op in ("dot", "convolution") and fid is not None:
        return fid
    return own

  out: dict[str, str] = {}
  inherit: dict[str, str] = {}  # fused computation -> the fusion calling it
  for instrs in comps.values():
    for name, op, fid, called in instrs:
      if op in _CONTROL:
        continue
      if op == "fusion":
        fid = fusion_frame(called, fid)
      out[name] = frame_component(fid) if fid is not None else "other"
      if op == "fusion" and called:
        inherit[called] = name
  # An instruction XLA made with no metadata at all (e.g. a matmul fusion of the attention
  # core) takes the component of the instructions that read it, else of those it reads.
  users: dict[str, list[str]] = collections.defaultdict(list)
  for name, ops in operands.items():
    for o in ops:
      users[o].append(name)
  orphans = [
    name
    for instrs in comps.values()
    for name, op, fid, called in instrs
    if name in out and fid is None and (op != "fusion" or fusion_frame(called, None) is None)
  ]
  for _ in range(3):
    for name in orphans:
      if out[name] != "other":
        continue
      for near in (users.get(name, []), operands.get(name, [])):
        known = [out[n] for n in near if out.get(n, "other") != "other"]
        if known:
          out[name] = collections.Counter(known).most_common(1)[0][0]
          break
  # Instructions XLA made inside a fusion (no metadata of their own) belong to the fusion.
  for comp_name, fusion in inherit.items():
    for name, op, fid, _called in comps.get(comp_name, []):
      if fid is None and name in out:
        out[name] = out[fusion]
  return out


def _events(trace_dir: str) -> list[dict[str, Any]]:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
  with gzip.open(paths[-1], "rt", encoding="utf-8") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X" and "dur" in e]


def profile_program(
  compiled: Any, args: tuple[Any, ...], calls: int = 3, warmup: int = 1
) -> dict[str, Any]:
  """Run `compiled(*args)` `calls` times under the profiler; time per component per call (s)."""
  mapping = instruction_components(compiled.as_text())
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    wall = (time.perf_counter() - t0) / calls
    events = _events(d)
  per: dict[str, float] = collections.defaultdict(float)
  matched = 0
  for e in events:
    comp = mapping.get(e["name"])
    if comp is None:
      continue
    matched += 1
    per[comp] += float(e["dur"]) * 1e-6 / calls
  if not matched:
    raise RuntimeError("the trace held no event named after an instruction of the program")
  charged = sum(per.values())
  return dict(
    wall_s=wall,
    charged_s=charged,
    components_s={k: per.get(k, 0.0) for k in ORDER if per.get(k, 0.0) > 0.0},
    events=matched,
    calls=calls,
  )


def report(name: str, dense: dict[str, Any], routed: dict[str, Any]) -> str:
  """A markdown table: per component, dense and routed ms per call and routed / dense."""
  rows = [
    f"{name}: wall per call dense {dense['wall_s'] * 1e3:.1f} ms, routed "
    f"{routed['wall_s'] * 1e3:.1f} ms (under the profiler); instruction time charged "
    f"{dense['charged_s'] * 1e3:.1f} / {routed['charged_s'] * 1e3:.1f} ms",
    "",
    "| component | dense ms | share | routed ms | share | routed - dense ms |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  dc, rc = dense["components_s"], routed["components_s"]
  for k in ORDER:
    a, b = dc.get(k, 0.0), rc.get(k, 0.0)
    if a == 0.0 and b == 0.0:
      continue
    rows.append(
      f"| {k} | {a * 1e3:.1f} | {a / dense['charged_s']:.1%} | {b * 1e3:.1f} | "
      f"{b / routed['charged_s']:.1%} | {(b - a) * 1e3:+.1f} |"
    )
  return "\n".join(rows)


def profile_trained(
  variants: list[Any], calls: int, log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
  """Profile every prefill variant `ir_jax.bench_trained.build` made (name -> result)."""
  out: dict[str, dict[str, Any]] = {}
  for v in variants:
    if v.kind != "prefill":
      continue
    log(f"profiling {v.name} ({calls} calls) ...")
    out[v.name] = profile_program(v.fn, v.args, calls=calls)
  return out
