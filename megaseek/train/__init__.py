"""The training loop (trainer.py), the components around it (callbacks.py) and job composition (job.py)."""
