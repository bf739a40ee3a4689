"""Text -> token ids with the `tokenizers` library, BOS/EOS as the tokenizer says or as asked."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from ir_jax.data.config import BYTE_TOKENIZER, DataError
from ir_jax.data.sources import REPO_ROOT
from ir_jax.tokenizer import (
  TOKENIZER_CONFIG_JSON,
  TOKENIZER_JSON,
  bytes_to_unicode,
  load_tokenizer,
  read_gguf,
  special_tokens_from_gguf,
)

BYTE_EOS = "<|endoftext|>"


def byte_tokenizer() -> Tokenizer:
  """257 tokens: id b is byte b, id 256 is `<|endoftext|>` (BOS and EOS). For tiny models."""
  spelling = bytes_to_unicode()
  vocab = {spelling[b]: b for b in range(256)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(BYTE_EOS, special=True, normalized=False)])
  return tok


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
  """A `tokenizers.Tokenizer` plus the ids put before and after every document."""

  tokenizer: Tokenizer
  prefix: tuple[int, ...]  # BOS ids
  suffix: tuple[int, ...]  # EOS ids
  source: str

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> np.ndarray:
    """Token ids `[n]` int32 of one document, BOS/EOS included."""
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    return np.asarray([*self.prefix, *ids, *self.suffix], dtype=np.int32)

  def decode(self, ids: Any) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _affixes(tok: Tokenizer, source: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The ids the tokenizer's post-processor puts around a text (its own BOS/EOS rule)."""
  plain = tok.encode("a", add_special_tokens=False).ids
  full = tok.encode("a").ids
  for k in range(len(full) - len(plain) + 1):
    if full[k : k + len(plain)] == plain:
      return tuple(full[:k]), tuple(full[k + len(plain) :])
  raise DataError(
    f"{source}: the post-processor rewrites text tokens ({plain} -> {full}); "
    "only processors that add tokens around the text are supported"
  )


def _magic(path: Path) -> bytes:
  with open(path, "rb") as f:
    return f.read(4)


def _declared_special(path: Path, tok: Tokenizer) -> dict[str, int]:
  """bos/eos ids the tokenizer's files declare: GGUF metadata or tokenizer_config.json."""
  out: dict[str, int] = {}
  if path.is_file() and _magic(path) == b"GGUF":
    try:
      info = special_tokens_from_gguf(read_gguf(path))
    except ValueError as e:
      raise DataError(f"data.tokenizer {str(path)!r}: {e}") from None
    for name in ("bos", "eos"):
      v = getattr(info, f"{name}_token_id")
      if v is not None:
        out[name] = v
    return out
  cfg_path = (path if path.is_dir() else path.parent) / TOKENIZER_CONFIG_JSON
  if cfg_path.is_file():
    try:
      cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # not JSON: no declared specials
      return out
    if not isinstance(cfg, dict):
      return out
    for name in ("bos", "eos"):
      value = cfg.get(f"{name}_token")
      if isinstance(value, dict):  # transformers writes AddedToken dicts sometimes
        value = value.get("content")
      if isinstance(value, str) and tok.token_to_id(value) is not None:
        out[name] = tok.token_to_id(value)
  return out


def load_text_tokenizer(
  spec: str, add_bos: bool | None = None, add_eos: bool | None = None
) -> TextTokenizer:
  """Load `spec` (tokenizer.json, a directory with one, a .gguf, or "byte").

  `add_bos`/`add_eos` None keep what the tokenizer's post-processor does,
  so `encode(text)` equals `tokenizer.encode(text).ids`; True adds the token
  the tokenizer declares, False removes it. Truncation and padding stored
  in the tokenizer.json are switched off: documents are never cut here.
  """
  if not spec:
    raise DataError(
      "data.tokenizer is empty and the model has no checkpoint to take one from; "
      "set data.tokenizer to a tokenizer.json, a model directory or a .gguf file"
    )
  path = Path(spec).expanduser()
  if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
    path = REPO_ROOT / path  # configs/ name files relative to the repository root
  if spec == BYTE_TOKENIZER:
    tok = byte_tokenizer()
  else:
    try:
      tok = load_tokenizer(path)
    except FileNotFoundError as e:
      raise DataError(
        f"data.tokenizer {spec!r}: {e}; point it at a tokenizer.json, a model "
        "directory or a .gguf (`python -m ir_jax.convert import ...` writes "
        f"{TOKENIZER_JSON})"
      ) from None
    except ValueError as e:
      raise DataError(f"data.tokenizer {spec!r}: {e}") from None
  tok.no_truncation()
  tok.no_padding()
  prefix, suffix = _affixes(tok, spec)

  def choose(name: str, want: bool | None, own: tuple[int, ...]) -> tuple[int, ...]:
    if want is None:
      return own
    if not want:
      return ()
    if own:
      return own
    # Only now: reading a GGUF's metadata again takes seconds.
    declared = {"bos": 256, "eos": 256} if spec == BYTE_TOKENIZER else _declared_special(path, tok)
    if name not in declared:
      raise DataError(
        f"data.add_{name}=True but tokenizer {spec!r} declares no {name.upper()} "
        f"token (no {name}_token in {TOKENIZER_CONFIG_JSON} or GGUF metadata); "
        f"set data.add_{name}=None or False"
      )
    return (declared[name],)

  return TextTokenizer(
    tokenizer=tok,
    prefix=choose("bos", add_bos, prefix),
    suffix=choose("eos", add_eos, suffix),
    source=spec,
  )
