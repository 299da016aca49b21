"""Embedded training tasks for the command line, the benchmarks and the notebooks.

``charlm``: a small character-level transformer language model trained on the source of
Python's standard library (no download).
"""

from gradchain.tasks import charlm

__all__ = ["charlm"]
