"""Running: composing a config, launching ranks, one run's directory, checkpoints, rank pools."""
