"""The input pipeline against independent references: the documents we wrote, `tokenizers`
called directly, transformers' SmolLM2 tokenizer, and numpy loops."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from ir_jax import assets
from ir_jax.data import (
  DataConfig,
  DataError,
  DataIterator,
  load_text_tokenizer,
  make_iterator,
  open_split,
  prepare,
)

SEQ_LEN = 32
WORDS = (
  "the king and queen of denmark speak softly while a ghost walks near castle walls "
  "news reports say markets rose today after rain fell on sydney café naïve 日本 "
  "über 42 1987 £ — “quoted” text"
).split()


def _doc(rng: random.Random, n_words: int) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_corpus(root: Path) -> tuple[list[Any], list[str]]:
  """Files in every supported layout, and the documents they hold (our reference)."""
  rng = random.Random(1234)
  docs: list[str] = []

  def new(n_words: int) -> str:
    # A serial number keeps documents distinct, so each has one place in the stream.
    d = f"doc{len(docs)} " + _doc(rng, n_words)
    docs.append(d)
    return d

  (root / "plays").mkdir()
  (root / "plays" / "whole.txt").write_text("\n" + new(120) + "\n\n", encoding="utf-8")
  paragraphs = [new(rng.randint(1, 60)) for _ in range(25)]
  (root / "plays" / "scenes.txt").write_text("\n\n \n".join(paragraphs) + "\n", encoding="utf-8")
  lines = [new(rng.randint(1, 30)) for _ in range(30)]
  (root / "lines.txt").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
  with open(root / "mixed.jsonl", "w", encoding="utf-8") as f:
    for i in range(20):
      f.write(
        json.dumps({"text": new(rng.randint(1, 40)), "domain": "wiki" if i % 2 else "web", "id": i})
        + "\n"
      )
  # Real text too: the first news articles, one per line.
  news = assets.read_text(assets.require(assets.news_file())).splitlines()[:6]
  (root / "news.txt").write_text("\n".join(news) + "\n", encoding="utf-8")
  docs.extend(line.strip() for line in news if line.strip())
  files = [
    "plays/whole.txt",
    dict(path="plays/scenes.txt", split_mode="blank_lines"),
    dict(path="lines.txt", split_mode="lines", domain="lines"),
    "mixed.jsonl",
    dict(path="news.txt", split_mode="lines", domain="news"),
  ]
  return files, docs


def train_tokenizer(docs: list[str], path: Path) -> Path:
  """A small BPE with a BOS/EOS template, saved as tokenizer.json."""
  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(
    docs,
    trainers.BpeTrainer(
      vocab_size=400,
      special_tokens=["<pad>", "<bos>", "<eos>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
    ),
  )
  tok.post_processor = processors.TemplateProcessing(
    single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
  )
  tok.save(str(path))
  return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Any]:
  root = tmp_path_factory.mktemp("corpus")
  files, docs = write_corpus(root)
  tok_path = train_tokenizer(docs, root / "tokenizer.json")
  cfg = DataConfig(
    files=tuple(files),
    tokenizer=str(tok_path),
    seq_len=SEQ_LEN,
    batch_size=4,
    data_dir=str(root / "tfds"),
    validation_fraction=0.25,
    seed=7,
    prefetch=0,
  )
  prepare(cfg, base_dir=root, verbose=False)
  direct = Tokenizer.from_file(str(tok_path))
  return {
    "root": root,
    "cfg": cfg,
    "docs": docs,
    "direct": direct,
    "doc_ids": [tuple(direct.encode(d).ids) for d in docs],
  }


def iterator(
  corpus: dict[str, Any], split: str = "train", batch_size: int | None = None, **kw: Any
) -> DataIterator:
  cfg = corpus["cfg"]
  if batch_size is not None:
    cfg = dataclasses.replace(cfg, batch_size=batch_size)
  kw.setdefault("num_epochs", 1)
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return make_iterator(cfg, split, base_dir=corpus["root"], **kw)


def doc_starts(batches: list[dict[str, np.ndarray]]) -> list[int]:
  """doc_ids of pad-mode rows that begin a document, in stream order."""
  return [
    int(d) for b in batches for d, c in zip(b["doc_ids"], b["chunk_ids"]) if d >= 0 and c == 0
  ]


def local_batches(it: DataIterator, limit: int | None = None) -> list[dict[str, np.ndarray]]:
  out = []
  while limit is None or len(out) < limit:
    try:
      out.append(it.next_local())
    except StopIteration:
      break
  return out


def segments(batches: list[dict[str, np.ndarray]]) -> list[tuple[int, ...]]:
  """Token tuples of every segment, in stream order."""
  out = []
  for b in batches:
    for inputs, seg in zip(b["inputs"], b["segment_ids"]):
      for s in range(1, int(seg.max()) + 1):
        out.append(tuple(int(t) for t in inputs[seg == s]))
  return out


def parse_stream(
  segs: list[tuple[int, ...]], docs: list[tuple[int, ...]], counts: list[int] | None = None
) -> list[int]:
  """Split the concatenated segments back into whole documents; return their order.

  Fails unless every document occurs exactly once (`counts[i]` times if
  given), contiguously, and every document boundary is also a segment boundary.
  """
  stream = [t for s in segs for t in s]
  seg_starts = set(np.cumsum([0] + [len(s) for s in segs]).tolist())
  left = Counter(dict(enumerate(counts))) if counts is not None else Counter(range(len(docs)))
  order, p = [], 0
  while p < len(stream):
    hits = [i for i in left if left[i] and tuple(stream[p : p + len(docs[i])]) == docs[i]]
    assert hits, f"tokens at stream offset {p} start no remaining document"
    i = max(hits, key=lambda j: len(docs[j]))
    assert p in seg_starts and p + len(docs[i]) in seg_starts, "a segment crosses documents"
    left[i] -= 1
    order.append(i)
    p += len(docs[i])
  return order


def check_row_format(b: dict[str, np.ndarray]) -> None:
  """Segments 1..k then padding; positions restart per segment; targets by a plain loop."""
  for r in range(b["inputs"].shape[0]):
    seg, pos = b["segment_ids"][r], b["positions"][r]
    inputs, targets, mask = b["inputs"][r], b["targets"][r], b["loss_mask"][r]
    n = int((seg > 0).sum())
    assert (seg[n:] == 0).all() and (inputs[n:] == 0).all() and (pos[n:] == 0).all()
    assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
    if n:
      assert seg[0] == 1
    for t in range(len(seg)):
      start = t == 0 or seg[t] != seg[t - 1]
      assert pos[t] == (0 if start or seg[t] == 0 else pos[t - 1] + 1)
      has_next = t + 1 < len(seg) and seg[t] != 0 and seg[t + 1] == seg[t]
      assert mask[t] == (1.0 if has_next else 0.0)
      assert targets[t] == (inputs[t + 1] if has_next else 0)


# ---------------------------------------------------------------------------


def test_every_token_exactly_once_and_no_cross_document_segments(corpus):
  docs = corpus["doc_ids"]
  seen: Counter[int] = Counter()
  total = 0
  for split in ("train", "validation"):
    batches = local_batches(iterator(corpus, split, mode="pack", shuffle=True))
    for b in batches:
      check_row_format(b)
    segs = segments(batches)
    order = parse_stream(segs, docs)
    seen.update(order)
    total += sum(len(s) for s in segs)
    # Packing leaves padding only at the very end of the epoch.
    flat = np.concatenate([b["segment_ids"].reshape(-1) for b in batches])
    assert (flat[: int((flat > 0).sum())] > 0).all()
  assert sorted(seen) == list(range(len(docs)))  # each document once, in exactly one split
  assert set(seen.values()) == {1}
  assert total == sum(len(d) for d in docs)
  want = Counter(t for d in docs for t in d)
  got: Counter[int] = Counter()
  for split in ("train", "validation"):
    for b in local_batches(iterator(corpus, split)):
      got.update(b["inputs"][b["segment_ids"] > 0].tolist())
  assert got == want


def test_pad_mode_rows_rebuild_each_document(corpus):
  by_doc: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
  domains: dict[tuple[str, int], str] = {}
  for split in ("train", "validation"):
    it = iterator(corpus, split, mode="pad", shuffle=False)
    for b in local_batches(it):
      check_row_format(b)
      for r in range(b["inputs"].shape[0]):
        if b["doc_ids"][r] < 0:
          assert (b["segment_ids"][r] == 0).all()
          continue
        seg = b["segment_ids"][r]
        assert set(seg.tolist()) <= {0, 1}  # one piece of one document per row
        key = (split, int(b["doc_ids"][r]))
        by_doc.setdefault(key, []).append((int(b["chunk_ids"][r]), b["inputs"][r][seg == 1]))
        domains[key] = it.domains[b["domain_ids"][r]]
  rebuilt = Counter(
    tuple(np.concatenate([c for _, c in sorted(chunks, key=lambda x: x[0])]))
    for chunks in by_doc.values()
  )
  assert rebuilt == Counter(corpus["doc_ids"])
  # Domains: explicit, from the JSONL field, or the parent directory name.
  assert set(domains.values()) == {"plays", "lines", "web", "wiki", "news"}


def test_tokens_equal_tokenizers_called_directly(corpus):
  tok = load_text_tokenizer(corpus["cfg"].tokenizer)
  direct = corpus["direct"]
  for d in corpus["docs"]:
    ids = direct.encode(d).ids
    assert tok.encode(d).tolist() == ids
    assert ids[0] == 1 and ids[-1] == 2  # the template's <bos> ... <eos>
  no_bos = load_text_tokenizer(corpus["cfg"].tokenizer, add_bos=False)
  assert no_bos.encode("the king").tolist() == direct.encode("the king").ids[1:]
  neither = load_text_tokenizer(corpus["cfg"].tokenizer, add_bos=False, add_eos=False)
  assert (
    neither.encode("the king").tolist() == direct.encode("the king", add_special_tokens=False).ids
  )


def test_two_processes_get_disjoint_shards_covering_the_split(corpus):
  n = len(open_split(corpus["cfg"], "train", base_dir=corpus["root"]))
  shards = []
  for pi in range(2):
    it = iterator(corpus, mode="pad", shuffle=True, process_index=pi, process_count=2)
    ids = doc_starts(local_batches(it))
    assert len(ids) == len(set(ids)) == it.documents_per_epoch
    shards.append(set(ids))
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(n))
  # Packed rows of the two shards hold exactly the tokens of the whole split.
  whole: Counter[int] = Counter()
  for b in local_batches(iterator(corpus)):
    whole.update(b["inputs"][b["segment_ids"] > 0].tolist())
  parts: Counter[int] = Counter()
  for pi in range(2):
    for b in local_batches(iterator(corpus, process_index=pi, process_count=2)):
      assert b["inputs"].shape == (2, SEQ_LEN)  # global batch 4 / 2 processes
      parts.update(b["inputs"][b["segment_ids"] > 0].tolist())
  assert parts == whole


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("mode,stop", [("pack", 5), ("pack", 31), ("pad", 9)])
def test_restored_state_continues_exactly(corpus, prefetch, mode, stop):
  cfg = dataclasses.replace(corpus["cfg"], prefetch=prefetch)
  kw = dict(
    mode=mode,
    shuffle=True,
    num_epochs=None,
    process_index=0,
    process_count=1,
    base_dir=corpus["root"],
  )
  a = make_iterator(cfg, "train", **kw)
  first = local_batches(a, stop)
  state = json.loads(json.dumps(a.get_state()))  # what a checkpoint stores
  want = local_batches(a, 12)
  b = make_iterator(cfg, "train", **kw)
  b.set_state(state)
  got = local_batches(b, 12)
  assert len(got) == len(want) == 12
  for x, y in zip(got, want):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  assert b.get_state() == a.get_state()
  assert len(first) == stop


def test_epochs_are_reshuffled_and_complete(corpus):
  it = iterator(corpus, mode="pad", shuffle=True)
  epoch = doc_starts(local_batches(it))
  assert sorted(epoch) == list(range(it.documents_per_epoch))
  two = doc_starts(local_batches(iterator(corpus, mode="pad", shuffle=True, num_epochs=2)))
  assert two[: len(epoch)] == epoch
  assert sorted(two[len(epoch) :]) == sorted(epoch) and two[len(epoch) :] != epoch
  unshuffled = doc_starts(local_batches(iterator(corpus, mode="pad", shuffle=False)))
  assert unshuffled == list(range(len(epoch)))


def test_state_from_another_layout_is_refused(corpus):
  a = iterator(corpus, process_index=0, process_count=2)
  b = iterator(corpus, process_index=1, process_count=2)
  with pytest.raises(DataError, match="process_index: saved 0, now 1"):
    b.set_state(a.get_state())
  with pytest.raises(DataError, match="not an ir_jax data iterator state"):
    b.set_state({"next_index": 3})


def test_batches_become_global_arrays_on_an_8_device_mesh(corpus):
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8, "tests/conftest.py asks XLA for 8 CPU devices"
  mesh = Mesh(devices.reshape(2, 4), ("data", "model"))
  cfg_batch = 8
  cfg = dataclasses.replace(corpus["cfg"], batch_size=cfg_batch)
  for axes, spec in (
    ("data", PartitionSpec("data", None)),
    (("data", "model"), PartitionSpec(("data", "model"), None)),
  ):
    kw = dict(
      mode="pad",
      shuffle=False,
      num_epochs=1,
      process_index=0,
      process_count=1,
      base_dir=corpus["root"],
    )
    ref = make_iterator(cfg, "train", **kw).next_local()
    batch = next(make_iterator(cfg, "train", mesh=mesh, batch_axes=axes, **kw))
    for k, arr in batch.items():
      assert isinstance(arr, jax.Array) and arr.shape == ref[k].shape
      want = spec if arr.ndim == 2 else PartitionSpec(spec[0])
      assert arr.sharding.spec == want, (k, arr.sharding.spec)
      np.testing.assert_array_equal(np.asarray(arr), ref[k])
    shards = {s.device: s.data.shape for s in batch["inputs"].addressable_shards}
    rows = cfg_batch // (2 if axes == "data" else 8)
    assert set(shards.values()) == {(rows, SEQ_LEN)}
  with pytest.raises(DataError, match="not divisible by the 8 shards"):
    make_iterator(
      dataclasses.replace(cfg, batch_size=4),
      "train",
      mesh=mesh,
      batch_axes=("data", "model"),
      base_dir=corpus["root"],
    )
  with pytest.raises(DataError, match=r"batch axes \['fsdp'\]"):
    make_iterator(cfg, "train", mesh=mesh, batch_axes="fsdp", base_dir=corpus["root"])


def test_too_few_documents_for_the_processes(corpus):
  with pytest.raises(DataError, match="fewer than the 1000 processes"):
    iterator(corpus, process_index=0, process_count=1000, batch_size=1000)


def test_seq_len_below_two_is_refused(corpus):
  from ir_jax.config import ConfigError

  with pytest.raises(ConfigError, match="seq_len must be an integer >= 2"):
    dataclasses.replace(corpus["cfg"], seq_len=1)
  source = open_split(corpus["cfg"], "train", base_dir=corpus["root"])
  tok = load_text_tokenizer(corpus["cfg"].tokenizer)
  with pytest.raises(DataError, match="seq_len must be >= 2"):
    DataIterator(source, tok, seq_len=1, batch_size=1, process_index=0, process_count=1)


def test_smollm2_pipeline_tokens_equal_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  gguf_path = assets.require(assets.smollm2_gguf())
  articles = [
    line.strip() for line in assets.read_text(assets.require(assets.news_file())).splitlines()[:4]
  ]
  (tmp_path / "news.txt").write_text("\n".join(articles) + "\n", encoding="utf-8")
  cfg = DataConfig(
    files=(str(tmp_path / "news.txt"),),
    split_mode="lines",
    tokenizer=str(gguf_path),
    seq_len=128,
    batch_size=2,
    data_dir=str(tmp_path / "tfds"),
    validation_fraction=0.0,
    prefetch=0,
  )
  prepare(cfg, verbose=False)
  it = make_iterator(
    cfg, "train", mode="pad", shuffle=False, num_epochs=1, process_index=0, process_count=1
  )
  chunks: dict[int, list[tuple[int, np.ndarray]]] = {}
  for b in local_batches(it):
    for r in range(b["inputs"].shape[0]):
      if b["doc_ids"][r] >= 0:
        chunks.setdefault(int(b["doc_ids"][r]), []).append(
          (int(b["chunk_ids"][r]), b["inputs"][r][b["segment_ids"][r] == 1])
        )
  ours = Counter(
    tuple(np.concatenate([c for _, c in sorted(v, key=lambda x: x[0])]).tolist())
    for v in chunks.values()
  )
  hf = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
  want = Counter(tuple(hf(a)["input_ids"]) for a in articles)
  assert ours == want
  assert max(len(k) for k in want) > 128  # an article spans several rows


def test_num_batches_keeps_uneven_processes_in_step(corpus):
  counts = [
    iterator(corpus, mode="pad", process_index=pi, process_count=2).local_batch_count()
    for pi in range(2)
  ]
  assert counts[0] != counts[1]  # the shards hold different amounts of text
  steps = max(counts)
  for pi in range(2):
    it = iterator(corpus, mode="pad", process_index=pi, process_count=2, num_batches=steps)
    got = local_batches(it)
    assert len(got) == steps
    for b in got[counts[pi] :]:  # padding only once the shard is used up
      assert (b["segment_ids"] == 0).all() and (b["loss_mask"] == 0).all()
      assert (b["doc_ids"] == -1).all()
    assert (got[counts[pi] - 1]["segment_ids"] > 0).any()


def test_orbax_checkpoint_through_grain_handler(corpus, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  a = iterator(corpus, num_epochs=None, shuffle=True)
  local_batches(a, 4)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
  mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(a)))
  mngr.wait_until_finished()
  want = local_batches(a, 3)
  b = iterator(corpus, num_epochs=None, shuffle=True)
  mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(b)))
  for x, y in zip(local_batches(b, 3), want, strict=True):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  saved = json.loads((tmp_path / "ckpt" / "4" / "data" / "process_0-of-1.json").read_text())
  assert saved["batches"] == 4 and saved["format"] == "ir_jax.data/1"


CHILD = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pi, port, arg = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pi)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from ir_jax.data import DataConfig, eval_iterator

cfg = DataConfig(**arg["cfg"])
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
local = eval_iterator(cfg, base_dir=arg["root"]).local_batch_count()
steps = int(multihost_utils.process_allgather(np.int32(local)).max())
it = eval_iterator(cfg, base_dir=arg["root"], mesh=mesh, batch_axes="data", num_batches=steps)
count = jax.jit(lambda b: (b["segment_ids"] > 0).sum())
tokens = 0
for batch in it:
  assert batch["inputs"].shape == (cfg.batch_size, cfg.seq_len)
  tokens += int(count(batch))  # a global reduction over both processes' rows
print(json.dumps({"pi": pi, "local": local, "steps": steps, "tokens": tokens}), flush=True)
"""


def test_two_real_jax_processes_build_global_batches(corpus, tmp_path):
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  cfg = dataclasses.replace(corpus["cfg"], batch_size=8, prefetch=2)
  arg = json.dumps({"cfg": dataclasses.asdict(cfg), "root": str(corpus["root"])})
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(pi), str(port), arg],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for pi in range(2)
  ]
  results = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-2000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  want = sum(
    int((b["segment_ids"] > 0).sum())
    for b in local_batches(iterator(corpus, "validation", mode="pad", shuffle=False))
  )
  assert [r["tokens"] for r in results] == [want, want]
  assert results[0]["steps"] == results[1]["steps"] == max(r["local"] for r in results)


# --------------------------------------------------------------------------- domain mix


def test_text_pieces_cut_at_line_breaks_and_cover_the_text():
  from ir_jax.data.pipeline import text_pieces

  text = "aaaa bbbb\ncccc dddd\neeee"  # 24 characters, line breaks at 9 and 19
  assert text_pieces(text, 12) == [(0, 9), (9, 19), (19, 24)]
  assert text_pieces("x" * 25, 10) == [(0, 10), (10, 20), (20, 25)]  # no break: hard cuts
  assert text_pieces("one two three four", 10) == [(0, 7), (7, 13), (13, 18)]  # spaces
  assert text_pieces("short", 100) == [(0, 5)]
  assert text_pieces("abc\n\n   \n\ndef", 4) == [(0, 3), (9, 13)]  # whitespace-only dropped
  rng = random.Random(5)
  for _ in range(50):
    t = "".join(rng.choice("ab \n") for _ in range(rng.randint(1, 300)))
    size = rng.randint(2, 40)
    pieces = text_pieces(t, size)
    assert all(0 < b - a <= size for a, b in pieces)
    # Whole text in order: what lies between pieces is whitespace only.
    edges = [0] + [x for p in pieces for x in p] + [len(t)]
    assert all(not t[edges[i] : edges[i + 1]].strip() for i in range(0, len(edges), 2))


def test_domain_mix_draws_every_domain_equally(corpus):
  cfg = dataclasses.replace(corpus["cfg"], train_mix="domains", piece_chars=80)
  src = open_split(cfg, "train", base_dir=corpus["root"])
  from ir_jax.data.pipeline import domain_table, text_pieces

  table = domain_table(src, 80, 0, 1)
  # The reference: pieces per domain by a plain loop over the records.
  pieces: dict[str, list[tuple[int, int, int]]] = {}
  for r in range(len(src)):
    text, dom = src.document(r)
    pieces.setdefault(dom, []).extend((r, a, b) for a, b in text_pieces(text, 80))
  doms = sorted(pieces)
  longest = max(len(v) for v in pieces.values())
  assert table.shape == (len(doms) * longest, 4)
  for i, row in enumerate(table):  # round-robin over domains
    assert src.document(int(row[1]))[1] == doms[i % len(doms)]
  for d in doms:  # every piece of every domain, cycled in order
    got = [tuple(int(v) for v in row[1:]) for row in table[doms.index(d) :: len(doms)]]
    assert got == [pieces[d][k % len(pieces[d])] for k in range(longest)]
  # Unshuffled, each run of D segments holds one piece of each domain; shuffled,
  # an epoch holds each domain equally often and packs the pieces' tokens.
  tok = load_text_tokenizer(cfg.tokenizer)
  kw = dict(process_index=0, process_count=1, base_dir=corpus["root"])
  it = make_iterator(cfg, "train", shuffle=True, num_epochs=1, **kw)
  batches = local_batches(it)
  segs = segments(batches)
  want = Counter(
    tuple(tok.encode(src.document(int(r))[0][a:b].strip()).tolist()) for _, r, a, b in table
  )
  order = parse_stream(segs, list(want), list(want.values()))
  assert Counter(order) == Counter(dict(enumerate(want.values())))
  # Evaluation and other splits still see whole documents.
  ev = make_iterator(cfg, "validation", mode="pad", shuffle=False, num_epochs=1, **kw)
  assert doc_starts(local_batches(ev)) == list(
    range(len(open_split(cfg, "validation", corpus["root"])))
  )


def test_domain_mix_state_restores_and_old_states_still_load(corpus):
  cfg = dataclasses.replace(corpus["cfg"], train_mix="domains", piece_chars=80)
  kw = dict(shuffle=True, num_epochs=None, process_index=0, process_count=1)
  a = make_iterator(cfg, "train", base_dir=corpus["root"], **kw)
  local_batches(a, 7)
  state = json.loads(json.dumps(a.get_state()))
  assert state["mix"] == "domains" and state["piece_chars"] == 80
  want = local_batches(a, 5)
  b = make_iterator(cfg, "train", base_dir=corpus["root"], **kw)
  b.set_state(state)
  for x, y in zip(local_batches(b, 5), want):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  # A documents-mix state (all states saved before the option) has no mix keys
  # and restores into a documents-mix iterator; a domains-mix iterator refuses it.
  plain = make_iterator(corpus["cfg"], "train", base_dir=corpus["root"], **kw)
  old = plain.get_state()
  assert "mix" not in old
  make_iterator(corpus["cfg"], "train", base_dir=corpus["root"], **kw).set_state(old)
  with pytest.raises(DataError, match="mix"):
    make_iterator(cfg, "train", base_dir=corpus["root"], **kw).set_state(old)


def test_max_doc_tokens_keeps_each_documents_first_tokens(corpus):
  """A capped evaluation stream is the uncapped documents, each cut to its first N tokens
  (shorter ones whole), every document once, packed as always."""
  cap = 12
  docs = corpus["doc_ids"]
  seen: Counter[int] = Counter()
  for split in ("train", "validation"):
    batches = local_batches(iterator(corpus, split, mode="pack", shuffle=True, max_doc_tokens=cap))
    for b in batches:
      check_row_format(b)
    order = parse_stream(segments(batches), [d[:cap] for d in docs], [1] * len(docs))
    seen.update(order)
  assert sorted(seen) == list(range(len(docs)))
  assert any(len(d) > cap for d in docs) and any(len(d) <= cap for d in docs)


def test_max_doc_tokens_is_refused_where_it_has_no_meaning(corpus):
  with pytest.raises(DataError, match="max_doc_tokens must be >= 0"):
    iterator(corpus, "validation", max_doc_tokens=-1)
  cfg = dataclasses.replace(corpus["cfg"], train_mix="domains", piece_chars=100)
  with pytest.raises(DataError, match="applies to mix 'documents' only"):
    make_iterator(
      cfg, "train", base_dir=corpus["root"], process_index=0, process_count=1, max_doc_tokens=8
    )
