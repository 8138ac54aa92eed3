"""``ldmkit probe``: the guide's vital signs for any diffusers pipeline and its LoRAs or
fine-tuned checkpoints, measured checkpoint by checkpoint on fixed points, so that the question
fine-tuners ask most (which checkpoint to keep) is answered from the same rules as a run's."""
