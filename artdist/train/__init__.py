"""Training stage: loss, loops, checkpoints, preemption, and the trainer that drives them."""
