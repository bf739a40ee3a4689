"""Experiments built on the library, each run by a thin driver in launch/.

    quality     the quality table: informed vs greedy routing on SmolLM2-135M, end to end
                (`python launch/quality_table.py`; plan, held-out sets, runs, report)
    shift       quality under data shift checked against measured perplexity
                (`python launch/shift_experiment.py`)
    tpu_decode  XLA's cost analysis of one routed decode step on a TPU topology
                (`python launch/tpu_decode_view.py`)

The top floor of the package: experiments import the library, nothing in the library
imports them.
"""
