"""Tokenizers built from GGUF metadata with the `tokenizers` library (no torch).

A GGUF file carries its tokenizer as metadata under llama.cpp key names
(``tokenizer.ggml.*``). For byte-level BPE vocabularies (``tokenizer.ggml.model
== "gpt2"``) we rebuild an equivalent ``tokenizers.Tokenizer``: BPE over the
stored tokens and merges, the pre-tokenizer llama.cpp uses for the stored
``tokenizer.ggml.pre``, control tokens as special added tokens, and a
post-processor that adds BOS/EOS only if the file asks for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from ir_jax.base_error import IrJaxError
from ir_jax.gguf_io import GGUFError, GGUFFile

# llama.cpp token types (gguf.TokenType): NORMAL=1, UNKNOWN=2, CONTROL=3,
# USER_DEFINED=4, UNUSED=5, BYTE=6.
_CONTROL = 3
_USER_DEFINED = 4

# llama.cpp pre-tokenizer names that use the plain GPT-2 split regex, which is
# what `pre_tokenizers.ByteLevel(use_regex=True)` implements.
_GPT2_REGEX_PRE = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}
# Names whose llama.cpp split is "each \p{N} alone" followed by the GPT-2 regex
# (SmolLM's HF tokenizer.json says the same: Digits(individual) + ByteLevel).
_DIGITS_THEN_GPT2_PRE = {
  "smollm",
  "starcoder",
  "refact",
  "command-r",
  "codeshell",
  "exaone",
  "minerva",
}

# Anything with GGUFReader's `fields[key].contents()`: ours (validating) or the gguf package's.
GGUFLike = Union[gguf.GGUFReader, GGUFFile]

TOKENIZER_JSON = "tokenizer.json"


class TokenizerError(IrJaxError, ValueError):
  """A tokenizer file is missing a piece, malformed or of an unsupported kind."""


TOKENIZER_CONFIG_JSON = "tokenizer_config.json"


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Special token ids/strings, BOS/EOS flags and chat template from a GGUF."""

  bos_token_id: int | None
  eos_token_id: int | None
  pad_token_id: int | None
  unk_token_id: int | None
  bos_token: str | None
  eos_token: str | None
  pad_token: str | None
  unk_token: str | None
  add_bos_token: bool
  add_eos_token: bool
  chat_template: str | None

  def ids(self) -> dict[str, int]:
    """``{"bos_token_id": ..., ...}`` for the ids the file defines (HF config names)."""
    named = {
      "bos_token_id": self.bos_token_id,
      "eos_token_id": self.eos_token_id,
      "pad_token_id": self.pad_token_id,
      "unk_token_id": self.unk_token_id,
    }
    return {k: v for k, v in named.items() if v is not None}


def _gguf_name(reader: GGUFLike) -> str:
  return str(
    getattr(reader, "path", None) or getattr(reader.data, "filename", None) or "<GGUF in memory>"
  )


def _value(reader: GGUFLike, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable-character table used by byte-level BPE."""
  printable = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      # Unprintable bytes are shifted past 255 so every byte gets a visible char.
      table[b] = chr(256 + extra)
      extra += 1
  return table


def special_tokens_from_gguf(reader: GGUFLike) -> SpecialTokens:
  """Read BOS/EOS/PAD/UNK ids and strings, add-BOS/EOS flags and the chat template."""
  tokens: list[str] = _value(reader, "tokenizer.ggml.tokens", [])

  if not isinstance(tokens, list):
    raise TokenizerError(f"{_gguf_name(reader)}: tokenizer.ggml.tokens must be an array of strings")

  def tok_id(key: str) -> int | None:
    v = _value(reader, f"tokenizer.ggml.{key}")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
      raise TokenizerError(
        f"{_gguf_name(reader)}: tokenizer.ggml.{key} must be an integer, got {str(v)[:100]!r}"
      )
    return v

  def tok_str(i: int | None) -> str | None:
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None

  bos, eos, pad, unk = (
    tok_id(k) for k in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id")
  )
  return SpecialTokens(
    bos_token_id=bos,
    eos_token_id=eos,
    pad_token_id=pad,
    unk_token_id=unk,
    bos_token=tok_str(bos),
    eos_token=tok_str(eos),
    pad_token=tok_str(pad),
    unk_token=tok_str(unk),
    # Absent flags mean "no": what transformers does for byte-level BPE files.
    add_bos_token=bool(_value(reader, "tokenizer.ggml.add_bos_token", False)),
    add_eos_token=bool(_value(reader, "tokenizer.ggml.add_eos_token", False)),
    chat_template=_value(reader, "tokenizer.chat_template"),
  )


def _pre_tokenizer(
  pre: str | None, add_prefix_space: bool, source: str
) -> pre_tokenizers.PreTokenizer:
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
  if pre is None or pre in _GPT2_REGEX_PRE:
    return byte_level
  if pre in _DIGITS_THEN_GPT2_PRE:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  # Other names (llama3, qwen2, ...) split text with different regexes;
  # guessing would silently produce ids the model was never trained on.
  raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) in {source}")


def tokenizer_from_gguf(reader: GGUFLike) -> Tokenizer:
  """Build a ``tokenizers.Tokenizer`` equal to the GGUF's byte-level BPE tokenizer.

  Raises ValueError for any ``tokenizer.ggml.model`` other than ``"gpt2"``, or
  for a pre-tokenizer name this module does not know.
  """
  source = _gguf_name(reader)
  model = _value(reader, "tokenizer.ggml.model")
  if model != "gpt2":
    raise TokenizerError(
      f"unsupported GGUF tokenizer model {model!r} (tokenizer.ggml.model) in {source}; "
      "only byte-level BPE ('gpt2') is supported"
    )
  tokens: list[str] = _value(reader, "tokenizer.ggml.tokens")
  merges_raw: list[str] | None = _value(reader, "tokenizer.ggml.merges")
  if not tokens or merges_raw is None:
    raise TokenizerError(f"{source} has no tokenizer.ggml.tokens or tokenizer.ggml.merges")
  types: list[int] = _value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  for key, v, kind in (
    ("tokens", tokens, str),
    ("merges", merges_raw, str),
    ("token_type", types, int),
  ):
    if not isinstance(v, list) or not all(isinstance(x, kind) for x in v):
      raise TokenizerError(
        f"{source}: tokenizer.ggml.{key} must be an array of "
        f"{'strings' if kind is str else 'integers'}"
      )
  if len(types) != len(tokens):
    raise TokenizerError(f"{source}: {len(tokens)} tokens but {len(types)} token types")

  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())

  def respell(token: str) -> str:
    # BPE pieces are stored in the byte alphabet; a token outside it (some
    # converters write raw UTF-8) is re-spelled so merges can reach it.
    if set(token) <= alphabet:
      return token
    return "".join(spelling[b] for b in token.encode("utf-8"))

  vocab = {respell(t): i for i, t in enumerate(tokens)}
  merges: list[tuple[str, str]] = []
  for m in merges_raw:
    parts = m.split(" ")
    if len(parts) != 2:
      raise TokenizerError(f"malformed merge {m!r} in {source}")
    merges.append((parts[0], parts[1]))

  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  add_prefix_space = bool(_value(reader, "tokenizer.ggml.add_space_prefix", False))
  tok.pre_tokenizer = _pre_tokenizer(_value(reader, "tokenizer.ggml.pre"), add_prefix_space, source)
  tok.decoder = decoders.ByteLevel()

  # Control tokens (<|im_start|> ...) must match whole and never be split.
  # One spelled outside the byte alphabet is not a real vocab entry (a
  # llama.cpp mislabel); adding it would grow the vocab, so skip it.
  special = [
    AddedToken(t, special=True, normalized=False)
    for t, ty in zip(tokens, types, strict=True)
    if ty == _CONTROL and set(t) <= alphabet
  ]
  tok.add_special_tokens(special)
  # llama.cpp also matches user-defined tokens whole, but they are not special.
  user = [
    AddedToken(t, special=False, normalized=False)
    for t, ty in zip(tokens, types, strict=True)
    if ty == _USER_DEFINED
  ]
  if user:
    tok.add_tokens(user)

  info = special_tokens_from_gguf(reader)
  steps: list[processors.PostProcessor] = [processors.ByteLevel(trim_offsets=False)]
  if info.add_bos_token or info.add_eos_token:
    steps.append(_bos_eos_template(info, source))
  tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
  return tok


def _bos_eos_template(info: SpecialTokens, source: str) -> processors.TemplateProcessing:
  pieces: list[tuple[str, int]] = []
  prefix, suffix = "", ""
  if info.add_bos_token:
    if info.bos_token is None or info.bos_token_id is None:
      raise TokenizerError(f"{source} sets add_bos_token but has no valid bos_token_id")
    pieces.append((info.bos_token, info.bos_token_id))
    prefix = f"{info.bos_token} "
  if info.add_eos_token:
    if info.eos_token is None or info.eos_token_id is None:
      raise TokenizerError(f"{source} sets add_eos_token but has no valid eos_token_id")
    pieces.append((info.eos_token, info.eos_token_id))
    suffix = f" {info.eos_token}"
  return processors.TemplateProcessing(
    single=f"{prefix}$A:0{suffix}",
    pair=f"{prefix}$A:0{suffix} {prefix}$B:1{suffix}",
    special_tokens=list(dict.fromkeys(pieces)),
  )


def _write_atomic(path: Path, text: str) -> None:
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def save_tokenizer(
  tok: Tokenizer, out_dir: str | os.PathLike[str], special: SpecialTokens | None = None
) -> Path:
  """Write ``tokenizer.json`` and ``tokenizer_config.json`` to ``out_dir``; return the former.

  The config carries the special token strings, add-BOS/EOS flags and chat
  template from ``special`` (if given), so transformers can load the folder too.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok_path = out / TOKENIZER_JSON
  _write_atomic(tok_path, tok.to_str(pretty=False))
  config: dict[str, Any] = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    # Decoding must return the text exactly; HF's cleanup would eat spaces.
    "clean_up_tokenization_spaces": False,
  }
  if special is not None:
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
      value = getattr(special, name)
      if value is not None:
        config[name] = value
    config["add_bos_token"] = special.add_bos_token
    config["add_eos_token"] = special.add_eos_token
    if special.chat_template is not None:
      config["chat_template"] = special.chat_template
  _write_atomic(
    out / TOKENIZER_CONFIG_JSON, json.dumps(config, indent=2, ensure_ascii=False) + "\n"
  )
  return tok_path


# The largest published tokenizer.json files are ~35 MB; this bounds what one read costs.
MAX_TOKENIZER_JSON = 512 << 20


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
  """A validated GGUF file (`ir_jax.gguf_io.GGUFFile`); ValueError names the file."""
  try:
    return GGUFFile(path)
  except GGUFError as e:
    raise TokenizerError(f"{path} is not a readable GGUF file ({e})") from None


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
  """Load a tokenizer from a ``tokenizer.json``, a directory holding one, or a ``.gguf`` file.

  Raises FileNotFoundError if nothing is there and ValueError if the file is
  not a (valid) tokenizer.json.
  """
  p = Path(path)
  if p.is_dir():
    candidate = p / TOKENIZER_JSON
    if not candidate.is_file():
      raise FileNotFoundError(f"no {TOKENIZER_JSON} in directory {p}")
    p = candidate
  elif not p.is_file():
    raise FileNotFoundError(f"tokenizer file not found: {p}")
  with open(p, "rb") as f:
    magic = f.read(4)
  if magic == b"GGUF":
    return tokenizer_from_gguf(read_gguf(p))
  size = p.stat().st_size
  if size > MAX_TOKENIZER_JSON:
    raise TokenizerError(
      f"{p} is not a tokenizer.json: {size} bytes, more than the "
      f"{MAX_TOKENIZER_JSON} any real one needs"
    )
  raw = p.read_bytes()
  try:
    obj = json.loads(raw)
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
    if isinstance(e, json.JSONDecodeError):
      reason = f"{e.msg} at line {e.lineno}"
    else:
      reason = "not UTF-8" if isinstance(e, UnicodeDecodeError) else str(e).split(":")[0][:100]
    raise TokenizerError(f"{p} is not a tokenizer.json: invalid JSON ({reason})") from None
  if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
    found = (
      f"an object with keys {sorted(obj)[:6]}"
      if isinstance(obj, dict)
      else f"a JSON {type(obj).__name__}"
    )
    raise TokenizerError(
      f"{p} is JSON but not a valid tokenizer.json: expected an object with "
      f"a 'model' object, found {found}"
    )
  del obj
  try:
    return Tokenizer.from_str(raw.decode("utf-8"))
  except Exception as e:  # tokenizers raises a bare Exception on bad content
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise TokenizerError(f"{p} is JSON but not a valid tokenizer.json: {first}") from None
