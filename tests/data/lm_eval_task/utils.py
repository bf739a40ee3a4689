"""Loads the local JSONL files beside this YAML: no dataset hub is reachable in tests."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str) -> datasets.DatasetDict:
  with open(os.path.join(HERE, name), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**kwargs) -> datasets.DatasetDict:
  return _load("tiny_mc.jsonl")


def load_gen(**kwargs) -> datasets.DatasetDict:
  return _load("tiny_gen.jsonl")
