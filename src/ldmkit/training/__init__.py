"""Stage-2 training: the loop and its callbacks (logging, divergence guard, held-out loss,
sampling, checkpoints), one optimizer step, the loop state that makes resume exact, and the
resume policy."""
