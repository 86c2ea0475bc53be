"""Slurm: batch scripts for training runs, and the sbatch/squeue/scancel wrappers."""
