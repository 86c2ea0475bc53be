"""What every process that imports the training code does first, before importing it: the rank
entry point (`pretrain.train.main`), the `kiln` commands that load a model, and the benchmarks.

Kept apart from the entry point so that callers take start-up settings from a module that
starts nothing itself.
"""

from __future__ import annotations

import os
import warnings


def quiet_imports() -> None:
    """Keep start-up noise that tells the user nothing out of the run's output."""
    import torch

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
