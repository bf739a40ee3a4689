"""The parts of launch/quality_table.py, importable: options, plan, held-out sets, report.

    common   repository, file formats, JSON helpers, git
    options  defaults, the --smoke budget, the command line (`Options`)
    plan     arms, evaluations, their commands, completeness, the time estimate
    heldout  `quality_table.py heldout`: the capped held-out sets
    report   results.json from a run's files; results.md and results.png

launch/quality_table.py puts launch/ on sys.path and imports them as `quality.*`.
"""
