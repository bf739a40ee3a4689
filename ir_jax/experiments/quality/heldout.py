"""`quality_table.py heldout`: the capped held-out sets the quality table is evaluated on.

Documents are taken round-robin over domains, in split/file order, each cut
at a line or word boundary to its first --doc-tokens tokens, until
--max-tokens (and --max-documents); written as JSONL (text, domain) with a
manifest (same name, .json) that says what was taken.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Sequence

from ir_jax.config_file import load_config
from ir_jax.data import sources
from ir_jax.data.builder import open_split
from ir_jax.data.config import FileSpec, from_config
from ir_jax.data.tokenize import load_text_tokenizer
from ir_jax.experiments.quality.common import HELDOUT_FORMAT, rel, write_json


def _cut(text: str, tok: Any, limit: int) -> tuple[str, int]:
  """The longest prefix found of `text`, cut at a line (else word) boundary, with at most
  `limit` tokens; (prefix, its token count)."""
  n = len(tok.encode(text))
  if n <= limit:
    return text, n
  pos = int(len(text) * limit / n)
  for _ in range(20):
    cut = text[:pos]
    nl = cut.rfind("\n")
    cut = cut[:nl] if nl > len(cut) // 2 else cut[: max(cut.rfind(" "), 1)]
    cut = cut.strip()
    n_cut = len(tok.encode(cut))
    if n_cut <= limit:
      return cut, n_cut
    pos = int(len(cut) * 0.97 * limit / n_cut)
  return "", 0


def build_heldout(argv: Sequence[str]) -> int:
  """`quality_table.py heldout`: a capped held-out set as JSONL (text, domain) + manifest."""
  p = argparse.ArgumentParser(
    prog="python launch/quality_table.py heldout", description=build_heldout.__doc__
  )
  p.add_argument("--config", required=True)
  p.add_argument(
    "--source", required=True, help="'split' (the config's eval split) or a text/JSONL file"
  )
  p.add_argument("--domain", default="", help="domain of every document of --source FILE")
  p.add_argument(
    "--only-domain", default="", help="keep only the documents of this domain (e.g. of a split)"
  )
  p.add_argument("--out", required=True, help="output .jsonl (manifest: same name, .json)")
  p.add_argument("--max-tokens", type=int, required=True)
  p.add_argument("--doc-tokens", type=int, required=True)
  p.add_argument("--max-documents", type=int, default=0)
  p.add_argument("--data-dir", default="", help="override data.data_dir of the config")
  a = p.parse_args(argv)

  cfg = load_config(a.config)
  if a.data_dir:
    cfg.data.data_dir = a.data_dir
  dcfg = from_config(cfg)
  tok = load_text_tokenizer(dcfg.tokenizer, dcfg.add_bos, dcfg.add_eos)
  if a.source == "split":
    src = open_split(dcfg, dcfg.eval_split, prepare_if_missing=True)
    docs = [(*src.document(i), f"{dcfg.eval_split}:{i}") for i in range(len(src))]
    desc = f"split {dcfg.eval_split!r} of {rel(a.config)}"
  else:
    fcfg = dataclasses.replace(dcfg, name="local", files=(FileSpec(a.source, domain=a.domain),))
    stats = sources.Stats()
    docs = [
      (d.text, d.domain, d.source)
      for f in sources.resolve_files(fcfg)
      for d in sources.read_documents(f, fcfg, stats)
    ]
    desc = rel(a.source)
  if a.only_domain:
    found = sorted({d for _, d, _ in docs})
    docs = [x for x in docs if x[1] == a.only_domain]
    if not docs:
      raise SystemExit(f"--only-domain {a.only_domain!r}: {desc} has domains {found}")
    desc += f", domain {a.only_domain!r}"
  by_domain: dict[str, list[tuple[str, str]]] = {}
  for text, domain, source in docs:
    by_domain.setdefault(domain, []).append((text, source))
  # Round-robin over domains, in order, until the token or document budget is spent.
  queues = {d: list(v) for d, v in by_domain.items()}
  chosen: list[dict[str, Any]] = []
  total = 0
  # Stop rather than add a fragment shorter than a quarter of a document's allowance.
  min_piece = min(a.doc_tokens, max(2, a.doc_tokens // 4))

  def room() -> bool:
    return a.max_tokens - total >= min_piece and (
      not a.max_documents or len(chosen) < a.max_documents
    )

  while any(queues.values()) and room():
    for d in list(queues):
      if not queues[d] or not room():
        continue
      text, source = queues[d].pop(0)
      limit = min(a.doc_tokens, a.max_tokens - total)
      full = len(tok.encode(text))
      cut, n = _cut(text, tok, limit)
      if n < 2:
        continue
      chosen.append(
        {"text": cut, "domain": d, "source": source, "tokens": n, "document_tokens": full}
      )
      total += n
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out + ".partial", "w", encoding="utf-8") as f:
    for c in chosen:
      f.write(
        json.dumps({dcfg.text_field: c["text"], dcfg.domain_field: c["domain"]}, ensure_ascii=False)
        + "\n"
      )
  os.replace(a.out + ".partial", a.out)
  doms = {
    d: {
      "documents": sum(c["domain"] == d for c in chosen),
      "tokens": sum(c["tokens"] for c in chosen if c["domain"] == d),
      "available_documents": len(v),
    }
    for d, v in by_domain.items()
  }
  manifest = {
    "format": HELDOUT_FORMAT,
    "jsonl": os.path.abspath(a.out),
    "source": desc,
    "config": rel(a.config),
    "tokenizer": dcfg.tokenizer,
    "max_tokens": a.max_tokens,
    "doc_tokens": a.doc_tokens,
    "max_documents": a.max_documents,
    "documents": len(chosen),
    "tokens": total,
    "domains": doms,
    "selection": "round-robin over domains in source order; each document cut at a "
    "line or word boundary to its first doc_tokens tokens; until "
    "max_tokens (and max_documents), stopping before a piece of "
    "less than doc_tokens / 4",
    "items": [{k: v for k, v in c.items() if k != "text"} for c in chosen],
  }
  write_json(os.path.splitext(a.out)[0] + ".json", manifest)
  print(
    f"{desc}: {len(chosen)} documents, {total} tokens "
    + ", ".join(f"{d} {v['documents']}/{v['tokens']}" for d, v in doms.items())
    + f" -> {a.out}"
  )
  return 0
