"""The quality table's parts (`python launch/quality_table.py` is the driver).

common   repository, file formats, JSON helpers, git
options  defaults, the --smoke budget, the command line (`Options`)
plan     arms, evaluations, their commands, completeness, the time estimate
heldout  `quality_table.py heldout`: the capped held-out sets
run      running the steps as resumable subprocesses, then the report
report   results.json from a run's files; results.md and results.png
"""
