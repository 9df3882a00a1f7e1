"""Training: the run config, optimizers, the jitted step, the guarded run directory, metrics, the trainer."""
