"""A TFDS catalogue-style dataset end to end: a small builder registered the way catalogue
datasets are (by class, looked up by name under data.data_dir), prepared with
`ir_jax.data prepare`, then read by the data pipeline and trained on. What a user of C4
meets, without the network: refused before preparing, the same documents after."""

from __future__ import annotations

import dataclasses
import os

import pytest
import tensorflow_datasets as tfds
from etils import epath

from ir_jax.data.builder import open_split
from ir_jax.data.config import DataConfig, DataError

pytestmark = pytest.mark.slow  # a short training run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "ir_jax_fake_catalogue"
TRAIN = [
  f"train document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 5 + 1)
  for i in range(40)
]
VALID = [f"validation document {i}: pack my box with five dozen liquor jugs." for i in range(6)]


class IrJaxFakeCatalogue(tfds.core.GeneratorBasedBuilder):
  """Registered under NAME like a catalogue dataset; generates TRAIN and VALID."""

  VERSION = tfds.core.Version("1.0.0")
  pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))  # not a package

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(TRAIN), "validation": self._generate_examples(VALID)}

  def _generate_examples(self, docs):
    for i, text in enumerate(docs):
      yield i, {"text": text}


def _config(tmp_path) -> str:
  conf = tmp_path / "conf.py"
  conf.write_text(
    f"import runpy\n\ndef get_config():\n"
    f"  cfg = runpy.run_path({os.path.join(REPO, 'configs', 'tiny.py')!r})['get_config']()\n"
    f"  cfg.data.name = {NAME!r}\n"
    f"  cfg.data.files = ()\n"
    f"  cfg.data.data_dir = {str(tmp_path / 'tfds')!r}\n"
    f"  cfg.data.seq_len = 32\n"
    f"  cfg.data.batch_size = 8\n"
    f"  cfg.train.stages = 'forecaster'\n"
    f"  cfg.train.forecaster.steps = 2\n"
    f"  cfg.train.eval_batches = 1\n"
    f"  return cfg\n"
  )
  return str(conf)


def test_catalogue_dataset_refused_then_prepared_then_trained(tmp_path):
  from ir_jax.config_file import load_config
  from ir_jax.data.__main__ import main as data_main
  from ir_jax.train import run, settings_from_config

  conf = _config(tmp_path)
  workdir = tmp_path / "run"
  with pytest.raises(DataError) as info:  # not prepared: one line, nothing created
    run(settings_from_config(load_config(conf)), str(workdir))
  assert "\n" not in str(info.value) and "python -m ir_jax.data prepare" in str(info.value)
  assert not workdir.exists()

  assert data_main(["prepare", "--config", conf]) == 0
  dcfg = DataConfig(name=NAME, tokenizer="byte", data_dir=str(tmp_path / "tfds"))
  for split, docs in (("train", TRAIN), ("validation", VALID)):
    src = open_split(dcfg, split)
    assert sorted(src.document(i)[0] for i in range(len(src))) == sorted(docs)
    assert {src.document(i)[1] for i in range(len(src))} == {NAME}  # one domain, its name
  with pytest.raises(DataError, match="no split 'test'"):
    open_split(dataclasses.replace(dcfg), "test")

  run(settings_from_config(load_config(conf)), str(workdir))
  assert (workdir / "run.json").is_file() and (workdir / "train_summary.json").is_file()
