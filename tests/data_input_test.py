"""Reading local text into TFDS: document splitting, bad input, splits, dataset identity,
catalogue errors, the configs' data sections and the command line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ir_jax.config import ConfigError
from ir_jax.data import DataConfig, DataError, from_config, load_text_tokenizer, open_split, prepare
from ir_jax.data.builder import local_builder, read_stats
from ir_jax.data.sources import resolve_files, split_of

REPO = Path(__file__).resolve().parent.parent


def texts(cfg: DataConfig, base: Path) -> dict[str, list[tuple[str, str]]]:
  """(text, domain) of every record in every split of a prepared local dataset."""
  out = {}
  for split in ("train", "validation"):
    try:
      src = open_split(cfg, split, base_dir=base)
    except DataError:
      continue
    out[split] = [src.document(i) for i in range(len(src))]
  return out


def config(tmp: Path, files: tuple, **kw) -> DataConfig:
  kw.setdefault("validation_fraction", 0.0)
  return DataConfig(
    files=files, tokenizer="byte", seq_len=16, batch_size=2, data_dir=str(tmp / "tfds"), **kw
  )


def test_split_modes_and_stripping(tmp_path):
  (tmp_path / "a.txt").write_text("  First para\nline two\n\n\n  \nSecond para  \n\n", "utf-8")
  cfg = config(tmp_path, ("a.txt",))
  for mode, want in (
    ("file", ["First para\nline two\n\n\n  \nSecond para"]),
    ("blank_lines", ["First para\nline two", "Second para"]),
    ("lines", ["First para", "line two", "Second para"]),
  ):
    c = dataclasses.replace(cfg, split_mode=mode)
    prepare(c, base_dir=tmp_path, verbose=False)
    got = sorted(t for t, _ in texts(c, tmp_path)["train"])
    assert got == sorted(want), mode


def test_crlf_and_byte_order_mark(tmp_path):
  (tmp_path / "w.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n\r\nthree\r\n")
  cfg = config(tmp_path, ("w.txt",), split_mode="blank_lines")
  prepare(cfg, base_dir=tmp_path, verbose=False)
  assert sorted(t for t, _ in texts(cfg, tmp_path)["train"]) == ["one\r\ntwo", "three"]


def test_empty_file_is_a_counted_skip(tmp_path, capsys):
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "blank.txt").write_text("\n  \n", "utf-8")
  (tmp_path / "ok.txt").write_text("hello", "utf-8")
  cfg = config(tmp_path, ("*.txt",))
  path = prepare(cfg, base_dir=tmp_path, verbose=True)
  out = capsys.readouterr().out
  assert "skipped empty files: 1 (first: empty.txt)" in out
  assert "skipped empty documents: 1 (first: blank.txt:1)" in out
  counts = read_stats(path)["counts"]
  assert counts["skipped_empty_files"] == 1 and counts["documents"] == 1
  assert texts(cfg, tmp_path)["train"] == [("hello", tmp_path.name)]


def test_only_empty_files_is_an_error(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(DataError, match="no documents in data.files"):
    prepare(config(tmp_path, ("empty.txt",)), base_dir=tmp_path, verbose=False)
  assert not local_builder(config(tmp_path, ("empty.txt",)), tmp_path, False).is_prepared()


def test_non_utf8_file(tmp_path):
  (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\nplain line\n")
  cfg = config(tmp_path, ("bad.txt",), split_mode="lines")
  with pytest.raises(
    DataError,
    match=r"bad.txt:1: not valid UTF-8 \(byte 0xe9 at record "
    r"offset 3\).*encoding.*'replace' or 'skip'",
  ):
    prepare(cfg, base_dir=tmp_path, verbose=False)
  c = dataclasses.replace(cfg, encoding_errors="replace")
  path = prepare(c, base_dir=tmp_path, verbose=False)
  assert sorted(t for t, _ in texts(c, tmp_path)["train"]) == ["caf\ufffd au lait", "plain line"]
  assert read_stats(path)["counts"]["replaced_bytes"] == 1
  c = dataclasses.replace(cfg, encoding_errors="skip")
  path = prepare(c, base_dir=tmp_path, verbose=False)
  assert [t for t, _ in texts(c, tmp_path)["train"]] == ["plain line"]
  assert read_stats(path)["counts"]["skipped_undecodable_records"] == 1
  c = dataclasses.replace(cfg, files=(dict(path="bad.txt", encoding="latin-1"),))
  prepare(c, base_dir=tmp_path, verbose=False)
  assert sorted(t for t, _ in texts(c, tmp_path)["train"]) == ["café au lait", "plain line"]


def test_declared_latin1_news_corpus(tmp_path):
  from ir_jax import assets

  lee = assets.require(assets.news_file()).parent / "lee.cor"
  raw = lee.read_bytes()
  with pytest.raises(UnicodeDecodeError):
    raw.decode("utf-8")
  cfg = config(tmp_path, (str(lee),), split_mode="lines")
  prepare(cfg, base_dir=tmp_path, verbose=False)
  got = sorted(t for t, _ in texts(cfg, tmp_path)["train"])
  assert got == sorted(line.strip() for line in raw.decode("latin-1").split("\n") if line.strip())
  assert any("£" in t for t in got)


def test_jsonl_bad_lines(tmp_path):
  lines = [
    '{"text": "good one", "domain": "wiki"}',
    "",
    '{"title": "no text here"}',
    '{"text": 5}',
    "not json",
    '["text"]',
    '{"text": "good two"}',
  ]
  (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
  cfg = config(tmp_path, ("d.jsonl",))
  with pytest.raises(
    DataError,
    match=r"d.jsonl:3: expected an object with a string 'text' "
    r"field, found keys \['title'\].*bad_records='skip'",
  ):
    prepare(cfg, base_dir=tmp_path, verbose=False)
  c = dataclasses.replace(cfg, bad_records="skip")
  path = prepare(c, base_dir=tmp_path, verbose=False)
  assert sorted(texts(c, tmp_path)["train"]) == [("good one", "wiki"), ("good two", "jsonl")]
  counts = read_stats(path)["counts"]
  assert counts["skipped_missing_text"] == 3 and counts["skipped_invalid_json"] == 1
  c = dataclasses.replace(c, files=(dict(path="d.jsonl", domain="forced"),))
  prepare(c, base_dir=tmp_path, verbose=False)
  assert {d for _, d in texts(c, tmp_path)["train"]} == {"forced"}


def test_split_by_content_hash(tmp_path):
  docs = [f"document number {i}" for i in range(400)]

  def expected(text: str) -> str:  # the rule, computed by hand
    u = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    return "validation" if u < 0.2 else "train"

  (tmp_path / "many.txt").write_text("\n".join(docs), "utf-8")
  (tmp_path / "rev.txt").write_text("\n".join(reversed(docs)), "utf-8")
  got = {}
  for name in ("many.txt", "rev.txt"):
    cfg = config(tmp_path, (name,), split_mode="lines", validation_fraction=0.2)
    prepare(cfg, base_dir=tmp_path, verbose=False)
    got[name] = {s: sorted(t for t, _ in v) for s, v in texts(cfg, tmp_path).items()}
  assert got["many.txt"] == got["rev.txt"]  # order of documents does not matter
  for split in ("train", "validation"):
    assert got["many.txt"][split] == sorted(d for d in docs if expected(d) == split)
  assert 50 < len(got["many.txt"]["validation"]) < 110
  assert split_of("x", 0.0) == "train" and split_of("x", 1.0) == "validation"


def test_missing_split_is_explained(tmp_path):
  (tmp_path / "a.txt").write_text("one\ntwo\n", "utf-8")
  cfg = config(tmp_path, ("a.txt",), split_mode="lines", validation_fraction=0.0)
  prepare(cfg, base_dir=tmp_path, verbose=False)
  with pytest.raises(
    DataError,
    match=r"has no split 'validation' \(it has \['train'\]\).*"
    "validation_fraction",
  ):
    open_split(cfg, "validation", base_dir=tmp_path)


def test_file_sets_do_not_collide(tmp_path):
  (tmp_path / "a.txt").write_text("alpha", "utf-8")
  (tmp_path / "b.txt").write_text("beta", "utf-8")
  a = config(tmp_path, ("a.txt",))
  ab = config(tmp_path, ("a.txt", "b.txt"))
  paths = {prepare(c, base_dir=tmp_path, verbose=False) for c in (a, ab)}
  assert len(paths) == 2
  assert [t for t, _ in texts(a, tmp_path)["train"]] == ["alpha"]
  assert sorted(t for t, _ in texts(ab, tmp_path)["train"]) == ["alpha", "beta"]
  before = local_builder(a, tmp_path, False).builder_config.name
  assert local_builder(a, tmp_path, False).builder_config.name == before  # stable
  (tmp_path / "a.txt").write_text("alphA", "utf-8")  # same size, new content
  assert local_builder(a, tmp_path, False).builder_config.name != before
  with pytest.raises(DataError, match="not prepared.*python -m ir_jax.data prepare"):
    open_split(a, "train", base_dir=tmp_path)
  # Options that change the content change the name too.
  moved = dataclasses.replace(a, validation_fraction=0.5)
  assert local_builder(moved, tmp_path, False).builder_config.name != before


def test_bad_file_lists(tmp_path):
  (tmp_path / "a.txt").write_text("alpha", "utf-8")
  (tmp_path / "sub").mkdir()
  with pytest.raises(DataError, match=r"data.files\[0\] 'nope/\*.txt' matches no file"):
    resolve_files(config(tmp_path, ("nope/*.txt",)), tmp_path)
  with pytest.raises(DataError, match="listed twice"):
    resolve_files(config(tmp_path, ("a.txt", "*.txt")), tmp_path)
  with pytest.raises(DataError, match="matches directory"):
    resolve_files(config(tmp_path, ("sub",)), tmp_path)


def test_missing_tokenizer(tmp_path):
  with pytest.raises(DataError, match=r"data.tokenizer '.*nope.json': tokenizer file not found"):
    load_text_tokenizer(str(tmp_path / "nope.json"))
  (tmp_path / "junk.json").write_text("{not json", "utf-8")
  with pytest.raises(DataError, match="is not a tokenizer.json"):
    load_text_tokenizer(str(tmp_path / "junk.json"))
  with pytest.raises(DataError, match="data.tokenizer is empty"):
    load_text_tokenizer("")


def test_bos_eos_from_declarations(tmp_path):
  from ir_jax.data import byte_tokenizer

  tok = load_text_tokenizer("byte", add_eos=True)
  assert tok.encode("hi").tolist() == [104, 105, 256]
  assert load_text_tokenizer("byte", add_bos=True).encode("hi").tolist() == [256, 104, 105]
  # A tokenizer.json that adds nothing itself: EOS comes from tokenizer_config.json.
  byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(DataError, match="declares no EOS token"):
    load_text_tokenizer(str(tmp_path / "tokenizer.json"), add_eos=True)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  tok = load_text_tokenizer(str(tmp_path), add_eos=True)
  assert tok.encode("a").tolist() == [97, 256]


def test_catalogue_dataset_not_prepared(tmp_path):
  cfg = DataConfig(name="c4/en", tokenizer="byte", data_dir=str(tmp_path))
  with pytest.raises(
    DataError,
    match=r"TFDS dataset 'c4/en' is not prepared under .* run "
    r"`python -m ir_jax.data prepare",
  ):
    open_split(cfg, "train")
  with pytest.raises(DataError, match="neither 'local', a TFDS catalogue dataset"):
    open_split(dataclasses.replace(cfg, name="no_such_dataset_xyz"), "train")


def test_prepared_directory_reads_like_a_catalogue_dataset(tmp_path):
  (tmp_path / "a.txt").write_text("alpha\nbeta\n", "utf-8")
  cfg = config(tmp_path, ("a.txt",), split_mode="lines")
  path = prepare(cfg, base_dir=tmp_path, verbose=False)
  src = open_split(DataConfig(name=path, tokenizer="byte"), "train")
  assert sorted(src.document(i) for i in range(len(src))) == [
    ("alpha", tmp_path.name),
    ("beta", tmp_path.name),
  ]


def test_config_validation():
  with pytest.raises(ConfigError, match="data.files is empty"):
    DataConfig()
  with pytest.raises(ConfigError, match="data.split_mode must be one of"):
    DataConfig(files=("x",), split_mode="paragraphs")
  with pytest.raises(ConfigError, match=r"data.files\[0\] must be a path string or a dict"):
    DataConfig(files=(dict(glob="x"),))
  with pytest.raises(ConfigError, match="validation_fraction must be a number in"):
    DataConfig(files=("x",), validation_fraction=1.5)
  from ir_jax.data import data_config

  with pytest.raises(ConfigError, match="unknown data config fields"):
    data_config({"files": "x", "seqlen": 3})


def load_cfg(name: str):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("name", ["tiny", "smollm2_135m", "llama7b", "llama3_8b"])
def test_shipped_configs_have_data_sections(name):
  cfg = load_cfg(name)
  d = from_config(cfg)
  assert d.seq_len >= 2 and d.batch_size >= 1
  if d.name == "local":
    files = resolve_files(d, REPO)
    assert files
    if name == "smollm2_135m":
      assert {f.domain for f in files} == {"shakespeare", "news", "wiki"}
      assert len(files) == 44  # 42 plays, the news file, the Wikipedia JSONL
  if name == "tiny":
    assert load_text_tokenizer(d.tokenizer).vocab_size == cfg.model.vocab_size


def test_cli_prepare_and_inspect(tmp_path, capsys):
  from ir_jax.data.__main__ import main

  (tmp_path / "a.txt").write_text("\n".join(f"line {i} of text" for i in range(20)), "utf-8")
  conf = tmp_path / "conf.py"
  conf.write_text(
    "import ml_collections\n"
    "def get_config():\n"
    "  cfg = ml_collections.ConfigDict()\n"
    f"  cfg.data = ml_collections.ConfigDict(dict(files=({str(tmp_path / 'a.txt')!r},),\n"
    "      tokenizer='byte', split_mode='lines', seq_len=8, batch_size=2,\n"
    f"      data_dir={str(tmp_path / 'tfds')!r}, validation_fraction=0.3, add_eos=None))\n"
    "  return cfg\n"
  )
  assert main(["prepare", "--config", str(conf)]) == 0
  out = capsys.readouterr().out
  assert "scanning 1 files" in out and "20 documents" in out
  assert (
    main(
      [
        "inspect",
        "--config",
        str(conf),
        "--config.data.seq_len=12",
        "--config.data.add_eos",
        "True",
        "--mode",
        "pad",
        "--split",
        "validation",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  assert "split 'validation'" in out and "int32[2, 12]" in out and "EOS ids [256]" in out


def test_cli_help_and_one_line_errors(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "ir_jax.data", *a],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,
    timeout=120,
  )
  r = run("--help")
  assert r.returncode == 0 and "prepare" in r.stdout and "inspect" in r.stdout
  conf = tmp_path / "conf.py"
  conf.write_text(
    "import ml_collections\n"
    "def get_config():\n"
    "  c = ml_collections.ConfigDict()\n"
    "  c.data = ml_collections.ConfigDict(dict(files=('missing/*.txt',), "
    "tokenizer='byte'))\n"
    "  return c\n"
  )
  r = run("prepare", "--config", str(conf))
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
    r.stderr.strip().splitlines()[-1]
  ]  # one line, no traceback
  assert "error: data.files[0] 'missing/*.txt' matches no file" in r.stderr
  r = run("prepare", "--config", str(conf), "--config.data.seq_len=1")
  assert r.returncode == 2 and "data.seq_len must be an integer >= 2" in r.stderr
  r = run("prepare", "--config", str(conf), "--config.data.seq_lem=128")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
    "python -m ir_jax.data: error: --config.data.seq_lem: unknown config field 'seq_lem' (did you "
    "mean 'seq_len'?)"
  ]
  r = run("prepare", "--config", str(conf), "--set", "data.seq_len=12")
  assert r.returncode == 2 and "--config.SECTION.FIELD=V" in r.stderr
  r = run("inspect", "--config", str(conf), "--config.data.seq_len=12", "--show-config")
  assert r.returncode == 0
  assert "  --config.data.seq_len=12\n" in r.stdout
  assert "  --config.data.tokenizer='byte'\n" in r.stdout
