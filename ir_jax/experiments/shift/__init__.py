"""The data-shift check (`python launch/shift_experiment.py` is the driver).

trials  scenarios, the documents' NLLs and texts, resampled trials, verdicts
report  docs/shift.{json,md,png}
"""
