"""prunectl: prune a large parent or train the small model from scratch, token-matched, on Slurm."""

__version__ = "0.1.0"
