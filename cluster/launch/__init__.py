"""Launchers that turn one training command into the processes of a run: the launch plan
(`plan.py`: which command every node runs, with which environment) and the local launcher
(`local.py`).

Launchers build and supervise commands, they never import torch or the training code: the
local launcher uses only the standard library, the plan reads the run's configuration.
"""

from .local import launch_local

__all__ = ["launch_local"]
