"""Training: `run_training` (run.py) calls the phases in order — setup.py (accelerator, inputs, run
directory, trainable model, objective), loop.py (the explicit loop), checkpointer.py over checkpoint.py
(the save and its format), finish.py (final save, samples, how the run ended, report) — with resume.py,
lock.py, signals.py, progress.py, facts.py, optim.py and faults.py beside them."""
