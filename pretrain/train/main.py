"""One rank of a training run: `python -m pretrain.train.main --run-dir DIR`.

Launched by `kiln train` (locally, or through Slurm, Kubernetes or Ray), with the launcher's
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment. The run
directory already holds the resolved, validated `config.yaml`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path


def quiet_imports() -> None:
    """Keep start-up noise that tells the user nothing out of the run's output."""
    import torch

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()
    quiet_imports()
    from .trainer import train

    return train(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
