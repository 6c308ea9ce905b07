"""Training: the explicit loop (loop.py), checkpoints (checkpoint.py), and the run orchestration (run.py)."""
