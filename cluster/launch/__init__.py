"""Launchers that turn one training command into the processes of a run.

Only the standard library is used here: launchers build and supervise commands, they never
import torch or the training code.
"""

from .local import launch_local

__all__ = ["launch_local"]
