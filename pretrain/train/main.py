"""One rank of a training run: `python -m pretrain.train.main --run-dir DIR`.

Launched by `kiln train` (locally, or through Slurm, Kubernetes or Ray), with the launcher's
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment. The run
directory already holds the resolved, validated `config.yaml`. A user mistake found here (a
`KilnError`: the data, a checkpoint, a tracking server) ends the rank with one line on rank 0
and the error's exit code (2); the launcher stops the others and relays it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_pipeline.errors import KilnError
from pretrain.startup import quiet_imports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()
    quiet_imports()
    from .trainer import train

    try:
        return train(args.run_dir)
    except KilnError as error:  # a user mistake found where the ranks run: one line
        if int(os.environ.get("RANK", "0")) == 0:  # every rank meets most of them alike
            print(error.line("kiln train"), file=sys.stderr, flush=True)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
