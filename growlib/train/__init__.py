"""Training: the loop every schedule runs on, data, FLOPs accounting, checkpoints."""
