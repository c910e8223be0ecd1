"""Training machinery: the loop, run state, per-step inputs, monitoring, validation, EMA and post-hoc EMA, the
classifier's training."""
