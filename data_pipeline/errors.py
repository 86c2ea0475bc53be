"""The data pipeline's error for a problem with the run as a whole, told in one line."""

from __future__ import annotations


class PrepareError(RuntimeError):
    """A problem with the output directory, the Ray cluster or the run, as one line."""
