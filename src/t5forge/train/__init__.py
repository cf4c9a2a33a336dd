"""The training engine: loop, train state, checkpoints, logging."""
