"""Experiments built on the library, each a package that a launch/ driver runs.

    quality  the quality table: informed vs greedy routing on SmolLM2-135M, end to end
             (`python launch/quality_table.py`; plan, held-out sets, runs, report)

The top floor of the package: experiments import the library, nothing in the library
imports them.
"""
