"""Using a trained run: generating samples (with guidance), scoring them (FD, precision/recall,
memorization), opening a run's weights for sampling, and exporting it to diffusers."""
