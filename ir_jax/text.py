"""Text decoding and wikitext cleaning for the project's text files (no fetching here).

`read_text` / `decode_replacing` apply the encoding policy (strict UTF-8, a
declared encoding for known non-UTF-8 files, counted replacements otherwise);
`wikitext_to_plain` / `iter_wiki_articles` turn a Wikipedia XML dump into plain
articles. `ir_jax.assets` (fetching) and `ir_jax.data` (reading) both use them.
"""

from __future__ import annotations

import bz2
import codecs
import html
import os
import re
import threading
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

# --------------------------------------------------------------------------
# Text decoding policy

# Files known not to be UTF-8, by file name. gensim's Lee corpus is Latin-1:
# lee.cor has a pound sign as byte 0xA3 at offset 20357 (lee_background.cor is
# plain ASCII today, but it is the same corpus, so it gets the same declaration).
DECLARED_ENCODINGS: dict[str, str] = {
  "lee_background.cor": "latin-1",
  "lee.cor": "latin-1",
}

_replace_count = threading.local()


def _count_and_replace(err: UnicodeError) -> tuple[str, int]:
  # Same output as errors="replace", but tallies the bytes it gives up on.
  if not isinstance(err, UnicodeDecodeError):
    raise err
  _replace_count.n = getattr(_replace_count, "n", 0) + (err.end - err.start)
  return "\ufffd", err.end


codecs.register_error("ir_jax.count_replace", _count_and_replace)


def decode_replacing(data: bytes) -> tuple[str, int]:
  """Decode UTF-8 with U+FFFD for bad bytes; return the text and how many bytes were replaced."""
  _replace_count.n = 0
  text = data.decode("utf-8", errors="ir_jax.count_replace")
  return text, _replace_count.n


def read_text(path: str | os.PathLike[str], encoding: str | None = None) -> str:
  """Read a text file under the project's encoding policy.

  With ``encoding`` given, decode strictly with it. Otherwise: strict UTF-8;
  on failure the encoding declared for this file name in
  ``DECLARED_ENCODINGS``; failing that, UTF-8 with replacement characters and
  a warning that says how many bytes were replaced.
  """
  p = Path(path)
  data = p.read_bytes()
  if encoding is not None:
    return data.decode(encoding)
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    pass
  declared = DECLARED_ENCODINGS.get(p.name)
  if declared is not None:
    return data.decode(declared)
  text, n_bad = decode_replacing(data)
  warnings.warn(
    f"{p}: not valid UTF-8 and no declared encoding; replaced {n_bad} undecodable "
    f"byte(s) with U+FFFD",
    UnicodeWarning,
    stacklevel=2,
  )
  return text


# --------------------------------------------------------------------------
# Wikipedia XML -> plain text

_DROP_LINK_NS = {"file", "image", "media", "category"}
# Interwiki prefixes whose bare links ([[wikt:word]]) should read as the word.
_INTERWIKI = {
    "w", "wikipedia", "wp", "wikt", "wiktionary", "s", "wikisource", "q", "wikiquote", "b",
    "wikibooks", "n", "wikinews", "v", "wikiversity", "commons", "c", "species", "meta", "m", "d",
}  # fmt: skip
# Tags whose content is not prose (formulas, image lists, code).
_DROP_CONTENT_TAGS = (
    "math", "gallery", "timeline", "source", "syntaxhighlight", "imagemap", "score", "hiero",
    "chem",
)  # fmt: skip

_RE_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_RE_REF_SELF = re.compile(r"<ref\b[^>]*/>", re.I)
_RE_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_RE_DROP_TAGS = re.compile(rf"<({'|'.join(_DROP_CONTENT_TAGS)})\b[^>]*>.*?</\1\s*>", re.I | re.S)
_RE_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_RE_EXT_LINK = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*(?:[ \t]+([^\]]*))?\]")
_RE_HEADING = re.compile(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_RE_BOLD_ITALIC = re.compile(r"'{2,}")
_RE_BR = re.compile(r"<br\s*/?\s*>", re.I)
_RE_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_LIST_MARK = re.compile(r"^[*#:;]+[ \t]*", re.M)
_RE_SPACES = re.compile(r"[ \t\u00a0\u2009\u200a\u202f]+")
_RE_BLANKS = re.compile(r"\n{3,}")


def _strip_balanced(text: str, open_tok: str, close_tok: str) -> str:
  """Remove every balanced ``open_tok ... close_tok`` span, nesting included.

  An opener that is never closed is dropped by itself rather than swallowing
  the rest of the article.
  """
  pattern = re.compile(re.escape(open_tok) + "|" + re.escape(close_tok))
  while True:
    out: list[str] = []
    stack: list[int] = []
    pos = 0
    for m in pattern.finditer(text):
      if m.group() == open_tok:
        if not stack:
          out.append(text[pos : m.start()])
        stack.append(m.start())
      elif stack:
        stack.pop()
        if not stack:
          pos = m.end()
    if not stack:
      out.append(text[pos:])
      return "".join(out)
    # Unclosed opener: delete just that token and rescan.
    first = stack[0]
    text = text[:first] + text[first + len(open_tok) :]


def _link_text(match: re.Match[str]) -> str:
  inner = match.group(1)
  target, sep, label = inner.partition("|")
  target = target.strip()
  prefix, colon, rest = target.lstrip(":").partition(":")
  if colon and not target.startswith(":") and prefix.strip().lower() in _DROP_LINK_NS:
    return ""
  if sep:
    # "[[a|b|c]]" only occurs in File links, dropped above; keep the last part.
    label = label.rsplit("|", 1)[-1].strip()
    if label:
      return label
  if colon and prefix.strip().lower() in _INTERWIKI:
    return rest.strip()
  return target.lstrip(":")


def wikitext_to_plain(text: str) -> str:
  """Strip MediaWiki markup from one article's wikitext, keeping the prose."""
  text = _RE_COMMENT.sub("", text)
  text = _RE_REF_SELF.sub("", text)
  text = _RE_REF.sub("", text)
  text = _RE_DROP_TAGS.sub("", text)
  text = _strip_balanced(text, "{{", "}}")
  text = _strip_balanced(text, "{|", "|}")
  # Innermost links first so captions of dropped File links do not leak.
  for _ in range(10):
    new = _RE_INNER_LINK.sub(_link_text, text)
    if new == text:
      break
    text = new
  text = _RE_EXT_LINK.sub(lambda m: m.group(1) or "", text)
  text = _RE_HEADING.sub(lambda m: m.group(2), text)
  text = _RE_BOLD_ITALIC.sub("", text)
  text = _RE_BR.sub("\n", text)
  text = _RE_TAG.sub("", text)
  text = _RE_MAGIC.sub("", text)
  text = html.unescape(text)
  # Leftovers of unbalanced markup must not survive into training text.
  for tok in ("{{", "}}", "[[", "]]"):
    text = text.replace(tok, "")
  text = _RE_LIST_MARK.sub("", text)
  lines = []
  for line in text.split("\n"):
    line = _RE_SPACES.sub(" ", line).strip()
    if line.startswith(("|", "!")):  # table rows that escaped a broken table
      continue
    lines.append(line)
  return _RE_BLANKS.sub("\n\n", "\n".join(lines)).strip()


def iter_wiki_articles(bz2_path: str | os.PathLike[str]) -> Iterator[dict[str, str]]:
  """Yield ``{"title", "text"}`` for each main-namespace, non-redirect page of a bz2 XML dump."""
  with bz2.open(bz2_path, "rb") as f:
    for _, elem in ET.iterparse(f, events=("end",)):
      if elem.tag.rpartition("}")[2] != "page":
        continue
      ns = elem.findtext("{*}ns")
      is_redirect = elem.find("{*}redirect") is not None
      title = elem.findtext("{*}title") or ""
      raw = elem.findtext("{*}revision/{*}text") or ""
      elem.clear()  # keep memory flat on big dumps
      if ns != "0" or is_redirect:
        continue
      plain = wikitext_to_plain(raw)
      if plain:
        yield {"title": title, "text": plain}
