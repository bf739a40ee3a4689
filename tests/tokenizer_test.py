"""Tests for ir_jax.tokenizer: GGUF -> tokenizers.Tokenizer, checked against transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from ir_jax import assets
from ir_jax.tokenizer import (
  SpecialTokens,
  load_tokenizer,
  save_tokenizer,
  special_tokens_from_gguf,
  tokenizer_from_gguf,
)

# Strings with no whitespace run right before a number: there transformers'
# GGUF loader and SmolLM2's real pre-tokenizer agree (see test below).
CASES = [
  "In 1987, 3.14159 and 42",
  "<|im_start|>user\nhi<|im_end|>",
  "<|endoftext|><|im_start|>assistant\nHello!<|im_end|>\n",
  "naïve café — 日本語, Ελληνικά, русский 🤖👍🏽 “quotes” ‘x’",
  "   three leading spaces",
  " one leading space and trailing   ",
  "\n\nleading newlines\n\n\nand blank lines\r\nCRLF\ttab",
  "don't you'll I'M we've",
  "",
  " ",
  "\n",
]

# Where SmolLM2's own tokenizer.json (Digits(individual) then ByteLevel, the
# same split llama.cpp uses for pre="smollm") differs from transformers 5's
# GGUF loader, which knows no "smollm" pre-tokenizer and uses plain GPT-2
# splitting: a whitespace run is cut at a digit, and any \p{N} char is
# isolated. Values are what the model's tokenizer produces.
SMOLLM_DIGIT_CASES = {
  "x\n\n15": ["x", "ĊĊ", "1", "5"],
  "in the  50 metres": ["in", "Ġthe", "ĠĠ", "5", "0", "Ġmetres"],
  " ½": ["Ġ", "Â½"],
}


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
  return gguf.GGUFReader(assets.require(assets.smollm2_gguf()))


@pytest.fixture(scope="module")
def ours(reader: gguf.GGUFReader) -> Tokenizer:
  return tokenizer_from_gguf(reader)


@pytest.fixture(scope="module")
def hf() -> Any:  # a transformers tokenizer; transformers is a test-only extra
  transformers = pytest.importorskip("transformers")
  path = assets.require(assets.smollm2_gguf())
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def news_text() -> str:
  return assets.read_text(assets.require(assets.news_file()))


@pytest.fixture(scope="module")
def news_paragraph(news_text: str) -> str:
  # The corpus has one article per line; the first three are about 3 KB.
  return "\n".join(news_text.splitlines()[:3])


@pytest.mark.parametrize("text", CASES)
def test_ids_match_transformers(ours: Tokenizer, hf: Any, text: str) -> None:
  assert ours.encode(text).ids == hf(text)["input_ids"]


def test_news_paragraph_matches_transformers(ours: Tokenizer, hf: Any, news_paragraph: str) -> None:
  assert len(news_paragraph) > 2000
  ids = ours.encode(news_paragraph).ids
  assert ids == hf(news_paragraph)["input_ids"]
  assert len(ids) > 400


def test_whole_news_corpus_matches_transformers_with_smollm_split(
  ours: Tokenizer, hf: Any, news_text: str
) -> None:
  """Same vocab, merges and special tokens as transformers on 360 KB, once
  transformers is given SmolLM2's actual pre-tokenizer."""
  fixed = Tokenizer.from_str(hf.backend_tokenizer.to_str())
  fixed.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  for text in [news_text, *CASES, *SMOLLM_DIGIT_CASES]:
    assert ours.encode(text).ids == fixed.encode(text).ids, text[:80]


@pytest.mark.parametrize("text,tokens", list(SMOLLM_DIGIT_CASES.items()))
def test_smollm_digit_split(ours: Tokenizer, text: str, tokens: list[str]) -> None:
  assert ours.encode(text).tokens == tokens


def test_decode_roundtrip(ours: Tokenizer, news_text: str) -> None:
  for text in [*CASES, *SMOLLM_DIGIT_CASES, news_text]:
    assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_special_tokens(ours: Tokenizer, reader: gguf.GGUFReader) -> None:
  info = special_tokens_from_gguf(reader)
  assert info.ids() == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "unk_token_id": 0}
  assert (info.bos_token, info.eos_token, info.unk_token) == (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
  )
  assert not info.add_bos_token and not info.add_eos_token
  assert ours.get_vocab_size(with_added_tokens=True) == 49152
  # Control tokens match whole, even glued to text, and count as special.
  assert ours.encode("a<|im_start|>b").tokens == ["a", "<|im_start|>", "b"]
  assert ours.decode(ours.encode("<|im_start|>hi<|im_end|>").ids) == "hi"
  # No BOS/EOS is added since the file says add_bos_token = false.
  assert ours.encode("hi").ids == [6004]


def test_chat_template_matches_transformers(
  ours: Tokenizer, hf: Any, reader: gguf.GGUFReader
) -> None:
  info = special_tokens_from_gguf(reader)
  assert info.chat_template == hf.chat_template
  messages = [{"role": "user", "content": "What is 2+2? Answer in 12 words."}]
  prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  if not isinstance(expected, list):  # transformers 5 returns a BatchEncoding here
    expected = expected["input_ids"]
  assert ours.encode(prompt).ids == list(expected)
  assert ours.encode(prompt).ids[0] == info.bos_token_id


def test_save_and_load(
  ours: Tokenizer, reader: gguf.GGUFReader, tmp_path: Path, news_paragraph: str
) -> None:
  info = special_tokens_from_gguf(reader)
  path = save_tokenizer(ours, tmp_path / "tok", info)
  assert path == tmp_path / "tok" / "tokenizer.json"
  config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
  assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
  assert config["pad_token"] == "<|im_end|>" and config["chat_template"] == info.chat_template
  want = ours.encode(news_paragraph).ids
  assert load_tokenizer(tmp_path / "tok").encode(news_paragraph).ids == want
  assert load_tokenizer(path).encode(news_paragraph).ids == want


def test_load_errors(tmp_path: Path) -> None:
  with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
    load_tokenizer(tmp_path / "nope.json")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json in directory"):
    load_tokenizer(tmp_path)
  bad = tmp_path / "tokenizer.json"
  bad.write_text("merges:\n  - a b\n")
  with pytest.raises(ValueError, match="is not a tokenizer.json: invalid JSON") as e:
    load_tokenizer(tmp_path)
  assert "\n" not in str(e.value)
  bad.write_bytes(b"\xff\xfe\x00garbage")
  with pytest.raises(ValueError, match="invalid JSON"):
    load_tokenizer(bad)
  bad.write_text('{"hello": "world"}')
  with pytest.raises(ValueError, match="JSON but not a valid tokenizer.json") as e:
    load_tokenizer(bad)
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# Synthetic GGUFs (no assets needed): a tiny byte-level vocab.


def _write_gguf(
  path: Path, model: str, pre: str | None = "gpt2", add_bos: bool = False, add_eos: bool = False
) -> Path:
  tokens = ["<s>", "</s>", "h", "i", "Ġ", "hi", "Ġhi"]
  w = gguf.GGUFWriter(str(path), arch="llama")
  w.add_tokenizer_model(model)
  if pre is not None:
    w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types([3, 3, 1, 1, 1, 1, 1])
  w.add_token_merges(["h i", "Ġ hi"])
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  w.add_add_bos_token(add_bos)
  w.add_add_eos_token(add_eos)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_synthetic_gguf_bos_eos(tmp_path: Path) -> None:
  plain = tokenizer_from_gguf(gguf.GGUFReader(_write_gguf(tmp_path / "a.gguf", "gpt2")))
  assert plain.encode("hi hi").tokens == ["hi", "Ġhi"]
  both = tokenizer_from_gguf(
    gguf.GGUFReader(_write_gguf(tmp_path / "b.gguf", "gpt2", add_bos=True, add_eos=True))
  )
  assert both.encode("hi hi").ids == [0, 5, 6, 1]
  assert both.encode("hi hi", add_special_tokens=False).ids == [5, 6]
  assert both.decode(both.encode("hi hi").ids) == "hi hi"
  info = special_tokens_from_gguf(gguf.GGUFReader(tmp_path / "b.gguf"))
  assert info == SpecialTokens(0, 1, None, None, "<s>", "</s>", None, None, True, True, None)
  bos_only = tokenizer_from_gguf(
    gguf.GGUFReader(_write_gguf(tmp_path / "c.gguf", "gpt2", add_bos=True))
  )
  assert bos_only.encode("hi").ids == [0, 5]


def test_unsupported_model_names_model_and_file(tmp_path: Path) -> None:
  path = _write_gguf(tmp_path / "spm.gguf", "llama")
  with pytest.raises(ValueError, match=r"unsupported GGUF tokenizer model 'llama'.*spm\.gguf"):
    tokenizer_from_gguf(gguf.GGUFReader(path))
  path = _write_gguf(tmp_path / "l3.gguf", "gpt2", pre="llama-bpe")
  with pytest.raises(ValueError, match=r"pre-tokenizer 'llama-bpe'.*l3\.gguf"):
    tokenizer_from_gguf(gguf.GGUFReader(path))


def test_load_tokenizer_accepts_gguf(tmp_path: Path) -> None:
  path = _write_gguf(tmp_path / "a.gguf", "gpt2")
  assert load_tokenizer(path).encode("hi").ids == [5]
