"""What grows around train.py's loop: the learning-rate schedule, the metrics log, held-out validation, and
recovery from failures (recovery.py)."""
